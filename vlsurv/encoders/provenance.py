"""Which encoder made a model's image tokens: kept in the model folder, checked before new scans are encoded.

Training writes ``image_encoder.json`` into its final model folder from the feature cache it trained on::

    {"key": {"encoder", "token_mode", "checkpoint_sha256", "preprocess_hash", "dtype", "compute"},
     "token_shape": [T, C], "encoder_config": {EncoderConfig}, "preprocess_config": {PreprocessConfig}}

``key`` is the cache's per-scan key (``vlsurv.encoders.cache.cache_key``): the architecture, token mode,
checkpoint sha256 (``random-init:<seed>`` for an untrained encoder), preprocessing hash, storage dtype and
the precision the encoder ran in (``compute``: ``float32``, ``bfloat16`` under autocast, or ``unrecorded`` for
a cache or record written before it was kept). ``check_encoder_matches`` refuses an encoder or preprocessing
whose key differs, so a model never reads tokens from an encoder it was not trained with, and
``vlsurv.pipeline`` encodes new scans in the recorded precision.
"""

from __future__ import annotations

import json
from pathlib import Path

from vlsurv.config import from_dict, load_config, to_dict
from vlsurv.data.transforms import PreprocessConfig, config_hash
from vlsurv.encoders.cache import ENCODER_FIELDS, UNRECORDED, CacheError, FeatureCache, cache_key
from vlsurv.encoders.generator_pretrain import BUILTIN_CHECKPOINT, builtin_sha256
from vlsurv.encoders.merlin import EncoderConfig, MerlinImageEncoder
from vlsurv.errors import ModelLoadError

IMAGE_ENCODER_NAME = "image_encoder.json"
ENCODER_CONFIG_NAME, PREPROCESS_CONFIG_NAME = "encoder.yaml", "preprocess.yaml"


class EncoderMismatchError(ModelLoadError):
    """An encoder, checkpoint or preprocessing that differs from the one a model was trained with."""


def cache_provenance(cache: FeatureCache) -> dict | None:
    """The record of the encoder behind every token of ``cache``, or None for a cache without encoder records
    (``encoder.yaml`` / ``preprocess.yaml`` absent, e.g. one written by hand).

    CacheError when the scans' keys differ, or when the YAML files describe another encoder than the tokens
    (an unfinished later `vlsurv encode` run).
    """
    root = cache.root
    if not ((root / ENCODER_CONFIG_NAME).is_file() and (root / PREPROCESS_CONFIG_NAME).is_file()):
        return None
    keys = {tuple(cache.entry(s)[f] for f in ENCODER_FIELDS) for s in cache.scan_ids}
    computes = {cache.entry(s)["compute"] for s in cache.scan_ids} - {UNRECORDED}
    if len(keys) != 1 or len(computes) > 1:
        found = f"precisions {sorted(computes)}"
        if len(keys) != 1:
            found = f"{len(keys)} keys {sorted(keys)[:2]}..."
        raise CacheError(
            f"feature cache {root}: expected every scan encoded by one encoder, preprocessing and precision, "
            f"found {found}; re-encode it with one `vlsurv encode` run"
        )
    key = {**dict(zip(ENCODER_FIELDS, keys.pop())), "compute": computes.pop() if computes else UNRECORDED}
    encoder_config = load_config(EncoderConfig, root / ENCODER_CONFIG_NAME)
    preprocess = load_config(PreprocessConfig, root / PREPROCESS_CONFIG_NAME)
    described = {
        "encoder": encoder_config.name,
        "token_mode": encoder_config.token_mode,
        "preprocess_hash": config_hash(preprocess),
    }
    differing = [f for f, value in described.items() if key[f] != value]
    if differing:
        raise CacheError(
            f"feature cache {root}: {ENCODER_CONFIG_NAME}/{PREPROCESS_CONFIG_NAME} describe another "
            f"{differing[0]} ({described[differing[0]]!r}) than the cached tokens' ({key[differing[0]]!r}); "
            "finish the last `vlsurv encode` run into this folder"
        )
    return {
        "key": key,
        "token_shape": list(cache.token_shape),
        "encoder_config": to_dict(encoder_config),
        "preprocess_config": to_dict(preprocess),
    }


def write_provenance(model_dir: str | Path, record: dict) -> Path:
    """``image_encoder.json`` in ``model_dir``."""
    path = Path(model_dir) / IMAGE_ENCODER_NAME
    path.write_text(json.dumps(record, indent=2, sort_keys=True))
    return path


def read_provenance(model_dir: str | Path) -> tuple[dict, EncoderConfig, PreprocessConfig]:
    """(record, encoder config, preprocessing config) of ``model_dir``'s ``image_encoder.json``."""
    path = Path(model_dir) / IMAGE_ENCODER_NAME
    if not path.is_file():
        raise EncoderMismatchError(
            f"{path}: does not exist, so the encoder this model was trained with is unknown (trained on a "
            "cache without encoder.yaml/preprocess.yaml?); build "
            "SurvivalPipeline(model, encoder, preprocess) yourself"
        )
    try:
        record = json.loads(path.read_text())
        absent = [f for f in ("key", "token_shape", "encoder_config", "preprocess_config") if f not in record]
    except (json.JSONDecodeError, TypeError) as err:
        raise EncoderMismatchError(f"{path}: expected a JSON object written by training ({err})") from err
    if absent:
        raise EncoderMismatchError(f"{path}: lacks field {absent[0]!r}")
    if isinstance(record["key"], dict):
        record["key"].setdefault("compute", UNRECORDED)
    encoder_config = from_dict(EncoderConfig, record["encoder_config"], source=f"{path} encoder_config")
    preprocess = from_dict(PreprocessConfig, record["preprocess_config"], source=f"{path} preprocess_config")
    return record, encoder_config, preprocess


def load_recorded_encoder(
    model_dir: str | Path, checkpoint: str | Path | None = None
) -> tuple[MerlinImageEncoder, PreprocessConfig, dict]:
    """(encoder, preprocessing, recorded key) ``model_dir`` was trained with, checked against its record (the
    key's ``dtype`` and ``compute`` say how to encode new scans).

    An untrained encoder (``random-init:<seed>``) is rebuilt from the recorded config and the package's
    pretrained tiny encoder (``vlsurv.encoders.generator_pretrain``, the demo's) is found by its sha256;
    otherwise ``checkpoint`` is the Merlin checkpoint file, and its sha256 must be the recorded one.
    """
    record, encoder_config, preprocess = read_provenance(model_dir)
    recorded = record["key"]["checkpoint_sha256"]
    if checkpoint is None and recorded == builtin_sha256():
        checkpoint = BUILTIN_CHECKPOINT  # the demo's shipped encoder
    if recorded.startswith("random-init:") and checkpoint is None:
        encoder = MerlinImageEncoder(encoder_config)
    elif checkpoint is None:
        raise EncoderMismatchError(
            f"{Path(model_dir) / IMAGE_ENCODER_NAME}: the model was trained on tokens of encoder checkpoint "
            f"{recorded!r}; give that checkpoint file (encoder_checkpoint=..., --encoder-checkpoint)"
        )
    else:
        encoder = MerlinImageEncoder.from_checkpoint(checkpoint, encoder_config)
    check_encoder_matches(model_dir, record, encoder, preprocess)
    return encoder, preprocess, record["key"]


def check_encoder_matches(
    model_dir: str | Path, record: dict, encoder: MerlinImageEncoder, preprocess: PreprocessConfig
) -> None:
    """EncoderMismatchError naming the first field where ``encoder`` + ``preprocess`` differ from
    ``record`` (the storage dtype and compute precision are the record's own: new scans are encoded in
    them)."""
    expected = record["key"]
    got = cache_key(encoder, preprocess, expected["dtype"])
    for field in ENCODER_FIELDS:
        if got[field] != expected[field]:
            raise EncoderMismatchError(
                f"{Path(model_dir) / IMAGE_ENCODER_NAME}: the model was trained with {field} "
                f"{expected[field]!r}, but the encoder given has {got[field]!r}; use the encoder, checkpoint "
                "and preprocessing it was trained with"
            )
