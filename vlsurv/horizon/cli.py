"""`vlsurv horizon`: fine-tune a 3D network for death within fixed horizons; one AUROC table for every model.

Steps: read the manifest and label every scan at every horizon (``labels``: early-censored scans excluded),
write the counts, fine-tune on the train split (``train``), save the model, predict the ``eval_split`` scans
and tabulate the horizon AUROC with bootstrap CIs of the network and of each ``--compare`` risk on the same
scans.

Outputs in OUT: ``config.yaml``; ``label_counts.json`` (positives, negatives, excluded per split and horizon,
written before training); ``checkpoints/``; ``model/`` (model.safetensors, horizon_model.json);
``predictions.csv`` (scan_id, patient_id, split, ``prob@<h>``); ``auroc.csv`` and ``metrics.json`` (the table,
label counts, notes, init message, timings).
"""

from __future__ import annotations

import argparse
import json
import time as timer
from pathlib import Path

import numpy as np

from vlsurv.config import add_config_arguments, config_from_args, save_config
from vlsurv.data.manifest import SPLITS, load_manifest
from vlsurv.horizon.config import HorizonConfig
from vlsurv.horizon.labels import HorizonError, horizon_labels
from vlsurv.horizon.table import COLUMNS, format_table, model_rows, parse_compare, read_risks

LABEL_RULE = (
    "positive: death at or before the horizon; "
    "negative: followed past the horizon (or censored exactly at it); "
    "excluded: censored before the horizon"
)


def run(cfg: HorizonConfig, log=print) -> dict:
    """Train, predict and tabulate (see the module docstring); returns metrics.json's content."""
    import pandas as pd
    from accelerate import Accelerator

    from vlsurv.horizon.data import HorizonVolumes
    from vlsurv.horizon.train import predict, prediction_frame, save_model, train

    started = timer.time()
    out = Path(cfg.out)
    manifest = load_manifest(cfg.manifest)
    labels = horizon_labels(manifest.time, manifest.event, cfg.horizons)
    counts = {split: labels.subset((manifest.split == split).to_numpy()).counts() for split in SPLITS}
    train_rows = (manifest.split == "train").to_numpy()
    everything = cfg.eval_split == "all"
    evaluated = np.ones(len(manifest), bool) if everything else (manifest.split == cfg.eval_split).to_numpy()
    for name, mask in (("train", train_rows), (cfg.eval_split, evaluated)):
        if not mask.any():
            raise HorizonError(f"{cfg.manifest}: no scans in split {name!r}; expected at least one")
    eval_table = manifest[evaluated].reset_index(drop=True)
    scan_ids = eval_table.scan_id.astype(str).tolist()
    others = [(source, read_risks(source, scan_ids)) for source in map(parse_compare, cfg.compare)]
    labels.subset(train_rows).require_both_classes(f"{cfg.manifest}, train split")
    accelerator = Accelerator(cpu=cfg.cpu, mixed_precision=cfg.mixed_precision)
    if accelerator.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        save_config(cfg, out / "config.yaml")
        (out / "label_counts.json").write_text(json.dumps({"rule": LABEL_RULE, "counts": counts}, indent=2))
    accelerator.wait_for_everyone()

    def say(message: str) -> None:
        if accelerator.is_main_process:
            log(f"vlsurv horizon: {message}")

    for name, count in counts["train"].items():
        say(
            f"horizon {name}, train split: {count['positives']} positives, {count['negatives']} negatives, "
            f"{count['excluded']} excluded (censored earlier)"
        )
    preprocess, cache = cfg.preprocess(), Path(cfg.volume_cache or out / "volume_cache")
    images = manifest.image.astype(str).tolist()
    train_set = HorizonVolumes(
        [images[i] for i in np.flatnonzero(train_rows)],
        labels.subset(train_rows),
        preprocess,
        cache,
        augment=cfg.augment,
        seed=cfg.seed,
    )
    result = train(cfg, accelerator, train_set, labels.subset(train_rows), say)
    save_model(accelerator, result.network, cfg)
    eval_labels = labels.subset(evaluated)
    eval_set = HorizonVolumes([images[i] for i in np.flatnonzero(evaluated)], eval_labels, preprocess, cache)
    probabilities = predict(accelerator, result.network, eval_set, cfg)
    groups = eval_table.patient_id.astype(str).to_numpy()
    rows = model_rows(
        f"{cfg.model} ({cfg.size})", probabilities, eval_labels, groups, cfg.bootstrap, cfg.seed
    )
    for source, risk in others:
        rows += model_rows(source.name, risk, eval_labels, groups, cfg.bootstrap, cfg.seed)
    metrics = {
        "eval_split": cfg.eval_split,
        "n_scans": len(eval_table),
        "label_rule": LABEL_RULE,
        "label_counts": counts,
        "table": rows,
        "notes": [f"{r['model']} at {r['horizon']}: {r['note']}" for r in rows if r["note"]],
        "init": result.init_message,
        "steps": result.step,
        "last_loss": result.last_loss,
        "train_seconds": result.seconds,
        "seconds": timer.time() - started,
    }
    if accelerator.is_main_process:
        prediction_frame(eval_table, probabilities, cfg.horizons).to_csv(out / "predictions.csv", index=False)
        pd.DataFrame(rows, columns=COLUMNS).to_csv(out / "auroc.csv", index=False)
        (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
        log(format_table(rows))
    return metrics


def main(argv: list[str] | None = None) -> int:
    """`vlsurv horizon`: fine-tune ResNet-18 / DenseNet-121 / Swin for death within fixed horizons."""
    parser = argparse.ArgumentParser(prog="vlsurv horizon", description=__doc__.splitlines()[0])
    add_config_arguments(parser, HorizonConfig, required=("manifest", "out"))
    run(config_from_args(HorizonConfig, parser.parse_args(argv)))
    return 0
