"""The feature cache: every scan preprocessed and encoded once, tokens stored as safetensors shards.

Layout of a cache folder::

    index.json               {"version": 1, "scans": {scan_id: entry}}
    shard-00000.safetensors  one tensor (T, C) per scan, key = scan_id
    encoder.yaml, preprocess.yaml   the resolved configs of the latest run

An index entry records ``shard``, ``shape`` [T, C], ``dtype``, ``encoder`` (architecture name),
``token_mode``, ``checkpoint_sha256`` (or ``random-init:<seed>``) and ``preprocess_hash``; all but
``shard`` and ``shape`` form the scan's key. A rerun skips scans whose key matches and re-encodes
the others. A shard is written to a temporary file and renamed into place, and the index is
replaced only after its shard is complete, so an interrupted run resumes where it stopped.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Iterable, Sequence
from pathlib import Path

import pandas as pd
import torch
from safetensors import safe_open
from safetensors.torch import save as save_safetensors
from torch.utils.data import Dataset
from tqdm.auto import tqdm

from vlsurv.config import load_config, save_config
from vlsurv.data.manifest import load_manifest
from vlsurv.data.transforms import PreprocessConfig, config_hash, preprocess_ct
from vlsurv.encoders.merlin import EncoderConfig, MerlinImageEncoder, tiny_config
from vlsurv.errors import InputError
from vlsurv.files import atomic_write
from vlsurv.progress import progress_bar

INDEX_NAME = "index.json"
INDEX_VERSION = 1
SHARD_PREFIX, SHARD_SUFFIX = "shard-", ".safetensors"
STORAGE_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
KEY_FIELDS = ("encoder", "token_mode", "checkpoint_sha256", "preprocess_hash", "dtype")


class CacheError(InputError):
    """A feature cache that is missing, inconsistent, or asked for a scan it does not hold."""


def cache_key(encoder: MerlinImageEncoder, preprocess: PreprocessConfig, dtype: str) -> dict[str, str]:
    """The fields that must match for a cached scan to be reused."""
    return {
        "encoder": encoder.name,
        "token_mode": encoder.config.token_mode,
        "checkpoint_sha256": encoder.weights_id,
        "preprocess_hash": config_hash(preprocess),
        "dtype": dtype,
    }


def encode_manifest(
    manifest: pd.DataFrame | str | Path,
    out: str | Path,
    encoder: MerlinImageEncoder,
    preprocess: PreprocessConfig | None = None,
    *,
    dtype: str = "float32",
    shard_size: int = 64,
    batch_size: int = 1,
    progress: bool = True,
) -> dict[str, int]:
    """Encode every scan of ``manifest`` whose cached key differs; returns {"encoded", "skipped"}.

    ``manifest`` is a manifest file (validated with ``load_manifest``) or a frame with ``scan_id``
    and ``image`` columns. Each batch (B, 1, H, W, D) goes through ``encoder`` to tokens (B, T, C),
    stored per scan as (T, C) in ``dtype``.
    """
    if dtype not in STORAGE_DTYPES:
        raise CacheError(f"dtype: expected one of {list(STORAGE_DTYPES)}, got {dtype!r}")
    if shard_size < 1 or batch_size < 1:
        raise CacheError(f"shard_size and batch_size: expected >= 1, got {shard_size} and {batch_size}")
    frame = load_manifest(manifest, require_survival=False) if isinstance(manifest, (str, Path)) else manifest
    missing = [c for c in ("scan_id", "image") if c not in frame.columns]
    if missing:
        raise CacheError(f"manifest: expected columns scan_id and image, missing {missing}")
    preprocess = preprocess or PreprocessConfig()
    root = Path(out)
    root.mkdir(parents=True, exist_ok=True)
    _remove_temporary_files(root)
    index = _read_index(root) if (root / INDEX_NAME).exists() else {"version": INDEX_VERSION, "scans": {}}
    entries = index["scans"]
    key = cache_key(encoder, preprocess, dtype)
    scans = [(str(s), str(i)) for s, i in zip(frame["scan_id"], frame["image"])]
    todo = [(s, i) for s, i in scans if {f: entries.get(s, {}).get(f) for f in KEY_FIELDS} != key]
    save_config(encoder.config, root / "encoder.yaml")
    save_config(preprocess, root / "preprocess.yaml")
    next_shard = _next_shard_number(root)
    with progress_bar(total=len(todo), desc="encode", unit="scan", enabled=progress) as bar:
        for start in range(0, len(todo), shard_size):
            shard_name = f"{SHARD_PREFIX}{next_shard:05d}{SHARD_SUFFIX}"
            tokens = _encode_scans(
                todo[start : start + shard_size], encoder, preprocess, dtype, batch_size, bar
            )
            _write_shard(root / shard_name, tokens, key)
            for scan_id, value in tokens.items():
                entries[scan_id] = {"shard": shard_name, "shape": list(value.shape), **key}
            _write_index(root, index)
            next_shard += 1
    _remove_unreferenced_shards(root, entries)
    return {"encoded": len(todo), "skipped": len(scans) - len(todo)}


def _encode_scans(
    scans: Sequence[tuple[str, str]],
    encoder: MerlinImageEncoder,
    preprocess: PreprocessConfig,
    dtype: str,
    batch_size: int,
    bar: tqdm,
) -> dict[str, torch.Tensor]:
    """Preprocess and encode ``scans`` in batches; {scan_id: (T, C) tensor in ``dtype``}."""
    tokens: dict[str, torch.Tensor] = {}
    for start in range(0, len(scans), batch_size):
        batch = scans[start : start + batch_size]
        volumes = torch.stack([preprocess_ct(image, preprocess) for _, image in batch])
        raw = encoder(volumes).to(device="cpu")
        encoded = raw.to(STORAGE_DTYPES[dtype])
        for (scan_id, _), raw_value, value in zip(batch, raw, encoded):
            if not torch.isfinite(raw_value).all():
                raise CacheError(f"scan_id {scan_id!r}: the encoder's tokens are not finite (NaN or inf)")
            if not torch.isfinite(value).all():
                raise CacheError(
                    f"scan_id {scan_id!r}: tokens are not finite in {dtype} (max |value| "
                    f"{raw_value.abs().max().item():.3g} exceeds its range); store float32 or bfloat16"
                )
            tokens[scan_id] = value.clone(memory_format=torch.contiguous_format)
        bar.update(len(batch))
    return tokens


def _write_shard(path: Path, tokens: dict[str, torch.Tensor], key: dict[str, str]) -> None:
    atomic_write(path, save_safetensors(tokens, metadata=key))


def _write_index(root: Path, index: dict) -> None:
    atomic_write(root / INDEX_NAME, json.dumps(index, indent=1, sort_keys=True).encode())


def _read_index(root: Path) -> dict:
    path = root / INDEX_NAME
    if not path.is_file():
        raise CacheError(f"feature cache {root}: {INDEX_NAME} does not exist (run `vlsurv encode` first)")
    try:
        index = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise CacheError(f"{path}: not valid JSON ({err})") from err
    if (
        not isinstance(index, dict)
        or index.get("version") != INDEX_VERSION
        or not isinstance(index.get("scans"), dict)
    ):
        raise CacheError(f"{path}: expected {{'version': {INDEX_VERSION}, 'scans': {{...}}}}")
    for scan_id, entry in index["scans"].items():
        absent = [f for f in ("shard", "shape", *KEY_FIELDS) if f not in entry]
        if absent:
            raise CacheError(f"{path}: entry for scan_id {scan_id!r} lacks field {absent[0]!r}")
    return index


def _shard_files(root: Path) -> list[Path]:
    return sorted(root.glob(f"{SHARD_PREFIX}*{SHARD_SUFFIX}"))


def _next_shard_number(root: Path) -> int:
    """One past the highest shard number on disk (orphans of a crashed run included)."""
    numbers = [
        int(p.name[len(SHARD_PREFIX) : -len(SHARD_SUFFIX)])
        for p in _shard_files(root)
        if p.name[len(SHARD_PREFIX) : -len(SHARD_SUFFIX)].isdigit()
    ]
    return max(numbers, default=-1) + 1


def _remove_temporary_files(root: Path) -> None:
    for path in root.glob(f".{SHARD_PREFIX}*{SHARD_SUFFIX}.tmp"):
        path.unlink()
    (root / f".{INDEX_NAME}.tmp").unlink(missing_ok=True)


def _remove_unreferenced_shards(root: Path, entries: dict[str, dict]) -> None:
    """Delete shards that no index entry points at (re-encoded scans, orphans of a crash)."""
    referenced = {entry["shard"] for entry in entries.values()}
    for path in _shard_files(root):
        if path.name not in referenced:
            path.unlink()


class FeatureCache:
    """Read-only view of a cache folder: ``get(scan_id)`` -> float32 tokens (T, C)."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        self._entries: dict[str, dict] = _read_index(self.root)["scans"]
        for scan_id, entry in self._entries.items():
            if not (self.root / entry["shard"]).is_file():
                raise CacheError(
                    f"{self.root / INDEX_NAME}: scan_id {scan_id!r} points at shard {entry['shard']}, "
                    f"which does not exist in {self.root}"
                )
        self._handles: dict[str, object] = {}

    @property
    def scan_ids(self) -> list[str]:
        return list(self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, scan_id: object) -> bool:
        return scan_id in self._entries

    def entry(self, scan_id: str) -> dict:
        """The index entry of ``scan_id`` (shard, shape, dtype, encoder, checkpoint, preprocessing)."""
        if scan_id not in self._entries:
            raise CacheError(
                f"scan_id {scan_id!r} is not in the feature cache {self.root} ({len(self)} scans cached); "
                "encode it with `vlsurv encode`"
            )
        return self._entries[scan_id]

    def get(self, scan_id: str) -> torch.Tensor:
        """Tokens of one scan as float32 (T, C)."""
        shard = self.entry(scan_id)["shard"]
        if shard not in self._handles:
            self._handles[shard] = safe_open(str(self.root / shard), framework="pt")
        return self._handles[shard].get_tensor(scan_id).float()

    @property
    def token_shape(self) -> tuple[int, int]:
        """(T, C) shared by every cached scan; CacheError when scans of several shapes are mixed."""
        shapes = {tuple(entry["shape"]) for entry in self._entries.values()}
        if len(shapes) != 1:
            raise CacheError(f"feature cache {self.root}: expected one token shape, found {sorted(shapes)}")
        return shapes.pop()

    def __getstate__(self) -> dict:
        """Open shard handles stay behind when a DataLoader worker receives a copy."""
        return {**self.__dict__, "_handles": {}}


class CachedTokenDataset(Dataset):
    """Items {"scan_id": str, "image_tokens": (T, C) float32} read from a FeatureCache."""

    def __init__(self, cache: FeatureCache, scan_ids: Iterable[str] | None = None) -> None:
        self.cache = cache
        self.scan_ids = list(cache.scan_ids if scan_ids is None else scan_ids)
        absent = [s for s in self.scan_ids if s not in cache]
        if absent:
            raise CacheError(
                f"feature cache {cache.root}: {len(absent)} requested scans are not cached (first: "
                f"{absent[:3]})"
            )

    def __len__(self) -> int:
        return len(self.scan_ids)

    def __getitem__(self, item: int) -> dict:
        scan_id = self.scan_ids[item]
        return {"scan_id": scan_id, "image_tokens": self.cache.get(scan_id)}


def build_encoder(
    preset: str = "full", config_path: str | Path | None = None, checkpoint: str | Path | None = None
) -> MerlinImageEncoder:
    """The encoder for ``vlsurv encode``: a preset ("full" Merlin or "tiny") or a YAML EncoderConfig,
    loaded from ``checkpoint`` when given, else deterministic random init from the config's seed."""
    if config_path is not None:
        config = load_config(EncoderConfig, config_path)
    else:
        config = EncoderConfig() if preset == "full" else tiny_config()
    if checkpoint is not None:
        return MerlinImageEncoder.from_checkpoint(checkpoint, config)
    return MerlinImageEncoder(config)


def main(argv: list[str] | None = None) -> int:
    """`vlsurv encode`: preprocess and encode every scan of a manifest into a feature cache."""
    parser = argparse.ArgumentParser(prog="vlsurv encode", description=main.__doc__)
    parser.add_argument("--manifest", required=True, help="cohort manifest (CSV or JSONL)")
    parser.add_argument("--out", required=True, help="cache folder (created; reused on rerun)")
    architecture = parser.add_mutually_exclusive_group()
    architecture.add_argument("--encoder", choices=("full", "tiny"), default="full", help="encoder preset")
    architecture.add_argument("--encoder-config", help="YAML EncoderConfig (replaces --encoder)")
    parser.add_argument("--checkpoint", help="Merlin checkpoint (.pt official/bare state dict, .safetensors)")
    parser.add_argument("--preprocess-config", help="YAML PreprocessConfig (default: Merlin's)")
    parser.add_argument("--dtype", choices=tuple(STORAGE_DTYPES), default="float32", help="storage dtype")
    parser.add_argument("--shard-size", type=int, default=64, help="scans per shard file")
    parser.add_argument("--batch-size", type=int, default=1, help="scans per encoder forward")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)
    encoder = build_encoder(args.encoder, args.encoder_config, args.checkpoint).to(args.device)
    preprocess = load_config(PreprocessConfig, args.preprocess_config) if args.preprocess_config else None
    counts = encode_manifest(
        args.manifest,
        args.out,
        encoder,
        preprocess,
        dtype=args.dtype,
        shard_size=args.shard_size,
        batch_size=args.batch_size,
    )
    print(f"encoded {counts['encoded']} scans, skipped {counts['skipped']} already cached -> {args.out}")
    return 0
