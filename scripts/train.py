"""The `accelerate launch` entry point:
`accelerate launch [--config_file ...] scripts/train.py --config X.yaml`."""

from __future__ import annotations

import sys

from vlsurv.train import main

if __name__ == "__main__":
    sys.exit(main())
