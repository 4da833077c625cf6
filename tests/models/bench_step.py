"""Moved to ``bench/vqgan.py`` (the issue's entry point); this shim keeps the old command:

    .venv/bin/python tests/models/bench_step.py [bench/vqgan.py's flags]

runs ``bench/vqgan.py --no-stage`` (model step and encode only, no Ray). Not collected by
pytest (the name does not start with ``test_``).
"""

from __future__ import annotations

import sys
from pathlib import Path

if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    from bench.vqgan import main

    main(["--no-stage", *sys.argv[1:]])
