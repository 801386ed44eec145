"""The `accelerate launch` entry point:
`accelerate launch [--config_file ...] scripts/train.py --config X.yaml`.

It runs `vlsurv train` through the console script's dispatch, so bad input ends as one line
``vlsurv train: error: ...`` with status 2, as it does under `vlsurv train` (``VLSURV_DEBUG=1`` shows the
traceback)."""

from __future__ import annotations

import sys

from vlsurv.cli import main

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
