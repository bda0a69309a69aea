"""Make synthetic image-editing training pairs: the ``ray job submit`` entry point.

    ray job submit --address http://HEAD:8265 --working-dir . -- \
        python jobs/synthesize_pairs.py --config configs/synthesize-pairs.yaml --set pairs.variants=4

Expands images x instructions x variants into an edit manifest, runs the dataset editing job on it
(resumable: a re-run edits nothing new) and exports a Parquet dataset with a dataset card under
``<output.uri>/dataset/``. Exit status: 0 done, 1 error budget exceeded (no export), 2 bad config
or inputs.
"""

from __future__ import annotations

import os
import sys

# `python jobs/synthesize_pairs.py` puts jobs/ on sys.path, not the uploaded working dir: add the
# repository root so `step1x_batch` imports from the source tree when it is not pip-installed.
_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)

from step1x_batch.recipes.synthesize import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
