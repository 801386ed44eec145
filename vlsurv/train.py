"""`vlsurv train` and `accelerate launch scripts/train.py`: stage 1 (VQA), stage 2 (joint survival) or
time-to-event pretraining (a YAML with ``stage: tte_pretrain``, vlsurv.tte) training.

    accelerate launch --config_file configs/accelerate/single_gpu.yaml scripts/train.py \
        --config configs/stage1.yaml [key=value ...] [--resume latest|PATH]
    vlsurv train --config configs/tiny/stage1.yaml output_dir=runs/tiny1

Overrides are dotted keys of ``TrainConfig`` (``optim.lr_lora=1e-5``,
``model.decoder_path=/models/radllama``). The same code runs in one process (`vlsurv train`) or in several
(`accelerate launch`); see the README, "Training".

This module is only the command line, like ``vlsurv/predict.py`` and ``vlsurv/evaluate.py`` beside it: the
training itself lives in ``vlsurv.training`` (``config``: ``TrainConfig``; ``setup``: model, data, optimizer;
``loop``: the ``Trainer``; ``objective`` and ``risk_sets``: the step loss; ``validation``; ``checkpoints``).
"""

from __future__ import annotations

import argparse

from vlsurv.training.config import load_train_config
from vlsurv.training.loop import train
from vlsurv.tte.config import is_tte_config, load_tte_config
from vlsurv.tte.training import train_tte


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="vlsurv train", description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--config", required=True, help="training YAML (configs/stage1.yaml, configs/tiny/...)"
    )
    parser.add_argument("--resume", help="'latest' (newest checkpoint of output_dir) or a checkpoint folder")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="dotted TrainConfig overrides")
    args = parser.parse_args(argv)
    if is_tte_config(args.config, args.overrides):  # stage: tte_pretrain (vlsurv.tte)
        train_tte(load_tte_config(args.config, args.overrides), resume=args.resume)
        return 0
    config = load_train_config(args.config, args.overrides)
    train(config, resume=args.resume)
    return 0
