"""Re-render the catalog items that changed and publish ``latest``: the ``ray job submit`` entry point.

    ray job submit --address http://HEAD:8265 --working-dir . -- \
        python jobs/rerender_catalog.py --config configs/rerender-catalog.yaml

Run it nightly. Only items whose fingerprint changed (new item, new image content, new
instruction, new model or parameters) are rendered; ``<output.uri>/catalog/latest.parquet`` is
replaced only after every row of the run is logged and the run is within its error budget.
Exit status: 0 published, 1 not published (error budget exceeded), 2 bad config or catalog.
"""

from __future__ import annotations

import os
import sys

# `python jobs/rerender_catalog.py` puts jobs/ on sys.path, not the uploaded working dir: add the
# repository root so `step1x_batch` imports from the source tree when it is not pip-installed.
_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)

from step1x_batch.recipes.catalog import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
