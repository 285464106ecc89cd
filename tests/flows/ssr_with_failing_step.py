"""The ``ssr`` command with its prepare-data step failing on bad data (test helper).

Used by test_flow_failures: it runs ``flows.cli.main`` in this process with the built-in
data preparation replaced by one that raises, as a broken dataset folder would.
"""

from __future__ import annotations

import sys

from flows.cli import main
from ssr_tasks.fewshot import tasks

MESSAGE = "glyphs/fewshot/val: expected at least 5 class folders, found 0"


def broken_data(*args, **kwargs):
    raise ValueError(MESSAGE)


if __name__ == "__main__":
    tasks.prepare_glyphs = broken_data
    sys.exit(main())
