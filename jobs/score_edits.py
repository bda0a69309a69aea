"""Score the edits of an output root with a judge (a VLM and image metrics): the ``ray job submit``
entry point. No image is written; a rerun scores only rows without a score for this judge and
prompt set.

    ray job submit --address http://HEAD:8265 --working-dir . -- \
        python jobs/score_edits.py s3://bucket/edits/run1 --config configs/judge-http.yaml

Exit status: 0 done, 1 stopped early (the output root's lease was lost), 2 refused (a bad config,
a judge that does not answer, a store that cannot be reached).
"""

from __future__ import annotations

import os
import sys

# `python jobs/score_edits.py` puts jobs/ on sys.path, not the uploaded working dir: add the
# repository root so `step1x_batch` imports from the source tree when it is not pip-installed.
_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)

from step1x_batch.recipes.score import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
