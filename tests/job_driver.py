"""Driver submitted by tests/test_job_submit.py with ``ray job submit --working-dir``.

Runs the real CLI entry (``pipeline.cli.main``) over the test-only stages, so the code path is the
one a user's job takes: attach to the cluster through RAY_ADDRESS, run the DAG, write outputs.
Usage: ``python -m tests.job_driver CONFIG [key=value ...]``.
"""

from __future__ import annotations

import os
import sys

from pipeline.cli import main
from tests.stages_for_tests import make_pipeline

if __name__ == "__main__":
    print("RAY_ADDRESS =", os.environ.get("RAY_ADDRESS"), flush=True)
    raise SystemExit(main(sys.argv[1:], pipeline_factory=make_pipeline))
