"""Edit every row of a manifest: the ``ray job submit`` entry point.

    ray job submit --address http://HEAD:8265 --working-dir . -- \
        python jobs/edit_dataset.py --config configs/step1x-edit-v1p1.yaml --set sampling.num_steps=20

Inside a Ray job it joins the cluster the job was submitted to ($RAY_ADDRESS); run directly, it
starts a private local Ray (``resources.ray_address: auto`` joins the cluster running on this
machine instead). Exit status: 0 done, 1 error budget exceeded, 2 bad config.
"""

from __future__ import annotations

import os
import sys

# `python jobs/edit_dataset.py` puts jobs/ on sys.path, not the uploaded working dir: add the
# repository root so `step1x_batch` imports from the source tree when it is not pip-installed.
_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)

from step1x_batch.recipes.score import edit_main as main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
