"""``python -m pipeline.train.local STAGE CONFIG [key=value ...]``: one training stage without Ray.

The same loop, task, checkpoints and outputs as under Ray Train, in this process: one process
(a single GPU or CPU), or one rank of ``torchrun --nproc_per_node N -m pipeline.train.local ...``
(torch.distributed env:// variables). The stage's upstream must be complete. Equivalent to
``python -m pipeline run CONFIG --only STAGE --no-ray``.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence


def main(argv: Sequence[str] | None = None) -> int:
    from pipeline.cli import main as cli_main

    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) < 2 or args[0].startswith("-"):
        print(__doc__.strip().splitlines()[0], file=sys.stderr)
        return 2
    stage, rest = args[0], args[1:]
    return cli_main(["run", *rest, "--only", stage, "--no-ray"])


if __name__ == "__main__":
    raise SystemExit(main())
