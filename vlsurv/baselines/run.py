"""`vlsurv baselines`: CoxPH, DeepSurv and DeepHit on the manifest's splits, as in the paper's Table 2.

Rows: CoxPH on the clinical covariates (lifelines, ``covariate_design``), and each of DeepSurv / DeepHit on
each modality: ``text`` the clinical sentence (``vlsurv.data.clinical``) embedded by a local text encoder,
``image`` the cached encoder tokens averaged over tokens, ``both`` the two concatenated (z-scored on train).
Every model trains on the manifest's train split, stops early on its val split and is scored on the
evaluated split (Harrell's C, ``vlsurv.metrics``), so the splits are those of the VLM. The MLPs run once per
seed (``seeds``); the first seed's test C-index gets a bootstrap CI over patients, and all seeds give the mean
and sd. CoxPH is deterministic: one fit.

Outputs in OUT: ``baselines.json`` (rows, split fingerprint, evaluated scan ids, config), ``config.yaml`` and
``predictions/<row>.csv`` (scan_id, patient_id, time, event, risk of the first seed, risk_seed<k> of each).
"""

from __future__ import annotations

import argparse
import json
import time as clock
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from vlsurv import metrics as M
from vlsurv.baselines import features as F
from vlsurv.baselines.models import MLPOptions, fit_coxph, fit_mlp
from vlsurv.config import add_config_arguments, bounded, check_fields, config_from_args, invalid, save_config
from vlsurv.data.clinical import clinical_sentence
from vlsurv.data.manifest import load_manifest

METHODS = ("coxph", "deepsurv", "deephit")
METHOD_NAMES = {"coxph": "CoxPH", "deepsurv": "DeepSurv", "deephit": "DeepHit"}
RESULTS = "baselines.json"


@dataclass
class BaselinesConfig:
    """Options of ``vlsurv baselines`` (saved as OUT/config.yaml); MLP defaults are the paper's."""

    manifest: str = ""
    """Cohort manifest (time, event, split and the clinical columns)."""
    out: str = ""
    """Output folder."""
    cache: str | None = None
    """Feature cache of `vlsurv encode` (needed by the image and both modalities)."""
    methods: list[str] = field(default_factory=lambda: ["coxph", "deepsurv", "deephit"])
    """Baselines to run: coxph, deepsurv, deephit."""
    modalities: list[str] = field(default_factory=lambda: ["text", "image", "both"])
    """Inputs of DeepSurv and DeepHit: text, image, both (CoxPH always uses the clinical covariates)."""
    tte_model: str | None = None
    """Final folder of a tte_pretrain run (vlsurv.tte): the image input becomes its pretrained features of the
    cached tokens, and those rows are flagged pre-train in `vlsurv table`."""
    text_encoder: str | None = None
    """Local HF encoder folder of the clinical sentence (e.g. Clinical-Longformer); null = packaged MiniLM."""
    clinical_template: str = "lung"
    """Clinical template (prompts/clinical/<name>.yaml or a path) of the sentence and the CoxPH columns."""
    split: str = "test"
    """Manifest split the C-index is measured on."""
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2, 3, 4])
    """Seeds of the MLPs; the first one's test C-index gets the bootstrap CI."""
    penalizer: float = bounded(0.05, ge=0.0)
    """L2 penalizer of CoxPH (lifelines, on standardized covariates)."""
    hidden: list[int] = field(default_factory=lambda: [64])
    """Hidden layer widths of the MLPs."""
    dropout: float = bounded(0.1, ge=0.0, lt=1.0)
    """Dropout after each hidden layer."""
    lr: float = bounded(1e-4, gt=0.0)
    """AdamW learning rate (paper: 1e-4)."""
    weight_decay: float = bounded(0.01, ge=0.0)
    """AdamW weight decay."""
    batch_size: int = bounded(32, ge=2)
    """Batch size (paper: 32)."""
    max_epochs: int = bounded(300, ge=1)
    """Most epochs of an MLP."""
    patience: int = bounded(20, ge=1)
    """Epochs without a lower validation loss before an MLP stops."""
    num_bins: int = bounded(10, ge=1)
    """DeepHit cuts (quantiles of the train event times)."""
    deephit_ranking_weight: float = bounded(0.5, ge=0.0)
    """Weight of DeepHit's ranking loss next to its likelihood."""
    bootstrap: int = bounded(1000, ge=1)
    """Bootstrap resamples of the C-index CI (patients)."""

    def __post_init__(self) -> None:
        check_fields(self)
        for name, allowed in (("methods", METHODS), ("modalities", F.MODALITIES)):
            values = getattr(self, name)
            if not values or any(v not in allowed for v in values):
                raise invalid("", name, f"expected one or more of {list(allowed)}, got {values}")
        if not self.seeds:
            raise invalid("", "seeds", "expected at least one seed, got []")

    def mlp_options(self) -> MLPOptions:
        return MLPOptions(
            tuple(self.hidden),
            self.dropout,
            self.lr,
            self.weight_decay,
            self.batch_size,
            self.max_epochs,
            self.patience,
            self.num_bins,
            self.deephit_ranking_weight,
        )


def _split_masks(table: pd.DataFrame, cfg: BaselinesConfig) -> dict[str, np.ndarray]:
    masks = {name: (table["split"] == name).to_numpy() for name in ("train", "val", cfg.split)}
    for name, mask in masks.items():
        events = int(table["event"].to_numpy()[mask].sum())
        if events == 0:
            raise F.BaselineError(
                f"{cfg.manifest}: split {name!r} has {int(mask.sum())} scans and no event; the baselines "
                "need events in the train, val and evaluated splits"
            )
    return masks


def _modality_features(table: pd.DataFrame, cfg: BaselinesConfig) -> dict[str, np.ndarray]:
    """{modality: (N, D)} for the requested modalities (the text encoder and cache are checked first)."""
    needs_text = any(m in ("text", "both") for m in cfg.modalities)
    image_modality = next((m for m in cfg.modalities if m != "text"), None)
    if needs_text:
        F.resolve_text_encoder(cfg.text_encoder)
    scan_ids = table["scan_id"].astype(str).tolist()
    image = F.image_features(cfg.cache, scan_ids, image_modality, cfg.tte_model) if image_modality else None
    text = None
    if needs_text:
        sentences = [clinical_sentence(row, cfg.clinical_template) for row in table.to_dict("records")]
        text = F.text_features(sentences, cfg.text_encoder)
    parts = {"text": [text], "image": [image], "both": [text, image]}
    return {m: np.concatenate(parts[m], axis=1) for m in cfg.modalities}


def _score(rows: pd.DataFrame, risk: np.ndarray, cfg: BaselinesConfig, seed: int) -> M.BootstrapCI:
    return M.bootstrap_ci(
        M.concordance_index,
        rows["time"].to_numpy(float),
        rows["event"].to_numpy(int),
        risk,
        n=cfg.bootstrap,
        seed=seed,
        groups=rows["patient_id"].to_numpy(),
    )


def _record(
    key: str,
    method: str,
    modality: str,
    rows: pd.DataFrame,
    risks: list[np.ndarray],
    cfg: BaselinesConfig,
    extra: dict,
) -> dict:
    """A result row: the first seed's C-index and CI, every seed's C-index, mean and sd."""
    first = _score(rows, risks[0], cfg, cfg.seeds[0])
    values = [M.concordance_index(rows["time"], rows["event"], r) for r in risks]
    return {
        "key": key,
        "method": METHOD_NAMES[method],
        "input": modality,
        "clinical": modality in ("clinical", "text", "both"),
        "ct_image": modality in ("image", "both"),
        "report": False,
        "pretrain": cfg.tte_model is not None and modality in ("image", "both"),
        "c_index": first.estimate,
        "c_index_ci": first.as_list(),
        "c_index_seeds": values,
        "c_index_mean": float(np.mean(values)),
        "c_index_sd": float(np.std(values, ddof=1)) if len(values) > 1 else None,
        "n_seeds": len(values),
        **extra,
    }


def run_baselines(cfg: BaselinesConfig) -> dict:
    """Fit every requested baseline; write OUT/baselines.json, config.yaml, predictions/; return the json."""
    table = load_manifest(cfg.manifest, check_files=False)
    deep = [m for m in cfg.methods if m != "coxph"]
    inputs = _modality_features(table, cfg) if deep else {}
    masks = _split_masks(table, cfg)
    train, val, test = masks["train"], masks["val"], masks[cfg.split]
    rows = table[test].reset_index(drop=True)
    time, event = table["time"].to_numpy(float), table["event"].to_numpy(int)
    out = Path(cfg.out)
    (out / "predictions").mkdir(parents=True, exist_ok=True)
    save_config(cfg, out / "config.yaml")
    results = []

    def save(key: str, risks: list[np.ndarray], seeds: list[int]) -> None:
        frame = rows[["scan_id", "patient_id", "time", "event"]].assign(risk=risks[0])
        for seed, risk in zip(seeds, risks):
            frame[f"risk_seed{seed}"] = risk
        frame.to_csv(out / "predictions" / f"{key}.csv", index=False)

    if "coxph" in cfg.methods:
        start = clock.perf_counter()
        risk = coxph_test_risk(table, cfg.split, cfg.clinical_template, cfg.penalizer)
        save("coxph_clinical", [risk], cfg.seeds[:1])
        extra = {"seconds": round(clock.perf_counter() - start, 2), "penalizer": cfg.penalizer}
        results.append(_record("coxph_clinical", "coxph", "clinical", rows, [risk], cfg, extra))
    for method in deep:
        for modality in cfg.modalities:
            start = clock.perf_counter()
            x_train, x_all = F.standardize(inputs[modality][train], inputs[modality])
            fits = [fit_mlp(method, x_all, time, event, train, val, cfg.mlp_options(), s) for s in cfg.seeds]
            risks = [fit.risk[test] for fit in fits]
            key = f"{method}_{modality}"
            save(key, risks, cfg.seeds)
            extra = {
                "seconds": round(clock.perf_counter() - start, 2),
                "best_epochs": [fit.best_epoch for fit in fits],
                "features": int(x_all.shape[1]),
            }
            results.append(_record(key, method, modality, rows, risks, cfg, extra))
    summary = {
        "kind": "baselines",
        "manifest": str(Path(cfg.manifest).resolve()),
        "split": cfg.split,
        "split_fingerprint": F.split_fingerprint(table),
        "evaluated_scan_ids": rows["scan_id"].astype(str).tolist(),
        "n": len(rows),
        "n_events": int(rows["event"].sum()),
        "text_encoder": str(F.resolve_text_encoder(cfg.text_encoder)),
        "rows": results,
        "config": asdict(cfg),
    }
    (out / RESULTS).write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def coxph_test_risk(table: pd.DataFrame, split: str, template: str | Path, penalizer: float) -> np.ndarray:
    """Log partial hazard (N_split,) of a CoxPH fitted on the train split's clinical covariates."""
    train, rows = table[table["split"] == "train"], table[table["split"] == split]
    design = F.covariate_design(train, rows, template)
    fitter = fit_coxph(F.covariate_design(train, train, template), train["time"], train["event"], penalizer)
    return fitter.predict_log_partial_hazard(design).to_numpy(float)


def coxph_c_index(
    table: pd.DataFrame, split: str = "test", template: str | Path = "lung", penalizer=0.05
) -> float:
    """Harrell's C on ``split`` of the clinical-only CoxPH baseline (the demo's ``c_index_clinical_only``)."""
    rows = table[table["split"] == split]
    return M.concordance_index(
        rows["time"], rows["event"], coxph_test_risk(table, split, template, penalizer)
    )


def main(argv: list[str] | None = None) -> int:
    """`vlsurv baselines`: CoxPH, DeepSurv and DeepHit on text, image and both (the paper's Table 2)."""
    parser = argparse.ArgumentParser(prog="vlsurv baselines", description=main.__doc__)
    add_config_arguments(parser, BaselinesConfig, required=("manifest", "out"))
    cfg = config_from_args(BaselinesConfig, parser.parse_args(argv))
    summary = run_baselines(cfg)
    for row in summary["rows"]:
        low, high = row["c_index_ci"]
        sd = (
            ""
            if row["c_index_sd"] is None
            else f", mean {row['c_index_mean']:.3f} sd {row['c_index_sd']:.3f}"
        )
        print(
            f"{row['method']:<8} {row['input']:<8} C-index {row['c_index']:.3f} [{low:.3f}, {high:.3f}]{sd}"
        )
    print(f"-> {Path(cfg.out) / RESULTS}")
    return 0
