"""The feature cache: every scan preprocessed and encoded once, tokens stored as safetensors shards.

Layout of a cache folder::

    index.json               {"version": 1, "scans": {scan_id: entry}}
    shard-00000.safetensors  one tensor (T, C) per scan, key = scan_id
    encoder.yaml, preprocess.yaml   the resolved configs of the latest run
    errors.jsonl             {"scan_id", "image", "error"} per scan that failed to load in the latest run

An index entry records ``shard``, ``shape`` [T, C], ``dtype``, ``encoder`` (architecture name),
``token_mode``, ``checkpoint_sha256`` (or ``random-init:<seed>``), ``preprocess_hash`` and ``compute`` (the
precision the encoder ran in: ``float32``, or ``bfloat16`` under autocast); all but ``shard`` and ``shape``
form the scan's key. A rerun skips scans whose key matches and re-encodes the others. Entries written before
``compute`` was recorded read as ``unrecorded``, which matches either precision (``same_key``).
A shard is written to a temporary file and renamed into place, and the index is replaced only after its shard
is complete, so an interrupted run resumes where it stopped.
Loading runs in DataLoader workers (``vlsurv.encoders.scans``); under ``accelerate launch`` every process
encodes a slice and writes its own shards (``vlsurv.encoders.parallel``), merged into one index.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Iterable
from pathlib import Path

import pandas as pd
import torch
from safetensors import safe_open
from safetensors.torch import save as save_safetensors
from torch.utils.data import Dataset
from tqdm.auto import tqdm

from vlsurv.config import load_config, save_config
from vlsurv.data.manifest import load_manifest
from vlsurv.data.transforms import PreprocessConfig, config_hash
from vlsurv.encoders.merlin import EncoderConfig, MerlinImageEncoder, tiny_config
from vlsurv.encoders.parallel import (
    ERRORS_NAME,
    EncodeGroup,
    accelerate_state,
    launched,
    merge_errors,
    merge_part_indices,
    process_slice,
    progress_of,
    remove_parts,
    shard_numbers,
    wait_for_all,
    write_part_errors,
    write_part_index,
    write_progress,
)
from vlsurv.encoders.scans import EncodeStats, scan_loader, scans_of
from vlsurv.errors import InputError
from vlsurv.files import atomic_write
from vlsurv.progress import progress_bar

INDEX_NAME = "index.json"
INDEX_VERSION = 1
SHARD_PREFIX, SHARD_SUFFIX = "shard-", ".safetensors"
STORAGE_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
#: The key less the compute precision: what an encoder and its preprocessing fix (``same_key`` lets an
#: unrecorded precision match either).
ENCODER_FIELDS = ("encoder", "token_mode", "checkpoint_sha256", "preprocess_hash", "dtype")
KEY_FIELDS = (*ENCODER_FIELDS, "compute")
AUTOCAST_MODES = ("auto", "bf16", "off")
UNRECORDED = "unrecorded"  # the compute precision of an entry written before it was recorded


class CacheError(InputError):
    """A feature cache that is missing, inconsistent, or asked for a scan it does not hold."""


def cache_key(
    encoder: MerlinImageEncoder, preprocess: PreprocessConfig, dtype: str, bf16: bool = False
) -> dict[str, str]:
    """The fields that must match for a cached scan to be reused (``bf16``: the encoder ran under bfloat16
    autocast)."""
    return {
        "encoder": encoder.name,
        "token_mode": encoder.config.token_mode,
        "checkpoint_sha256": encoder.weights_id,
        "preprocess_hash": config_hash(preprocess),
        "dtype": dtype,
        "compute": "bfloat16" if bf16 else "float32",
    }


def same_key(entry: dict, key: dict[str, str]) -> bool:
    """Whether an index entry (or a recorded key) has ``key``; an ``unrecorded`` compute matches either."""
    return all(
        entry.get(field) == value or (field == "compute" and entry.get(field) == UNRECORDED)
        for field, value in key.items()
    )


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
    num_workers: int = 0,
    strict: bool = False,
    autocast: str = "auto",
    stats: EncodeStats | None = None,
) -> dict[str, int]:
    """Encode every scan of ``manifest`` whose cached key differs; returns {"encoded", "skipped", "failed"}.

    ``manifest`` is a manifest file (validated with ``load_manifest``) or a frame with ``scan_id``
    and ``image`` columns (and optionally the override columns). ``num_workers`` DataLoader processes load
    and resample while the encoder runs. Each batch (B, 1, H, W, D) goes through ``encoder`` (bf16 autocast
    on a GPU with ``autocast="auto"``, ``"bf16"`` anywhere, ``"off"``) to tokens (B, T, C), stored per
    scan as (T, C) in ``dtype``. A scan that fails to load is recorded in ``errors.jsonl`` and skipped, or
    raises ``CacheError`` with ``strict``. Under ``accelerate launch`` each process encodes its slice
    (``vlsurv.encoders.parallel``); counts are over all processes on the main one, over its own slice on
    the others. ``stats`` (optional) receives this process's seconds per stage and memory.
    """
    began = time.perf_counter()
    if dtype not in STORAGE_DTYPES:
        raise CacheError(f"dtype: expected one of {list(STORAGE_DTYPES)}, got {dtype!r}")
    if shard_size < 1 or batch_size < 1:
        raise CacheError(f"shard_size and batch_size: expected >= 1, got {shard_size} and {batch_size}")
    if num_workers < 0:
        raise CacheError(f"num_workers: expected an integer >= 0, got {num_workers}")
    if autocast not in AUTOCAST_MODES:
        raise CacheError(f"autocast: expected one of {list(AUTOCAST_MODES)}, got {autocast!r}")
    frame = load_manifest(manifest, require_survival=False) if isinstance(manifest, (str, Path)) else manifest
    missing = [c for c in ("scan_id", "image") if c not in frame.columns]
    if missing:
        raise CacheError(f"manifest: expected columns scan_id and image, missing {missing}")
    preprocess = preprocess or PreprocessConfig()
    stats = stats if stats is not None else EncodeStats()
    root = Path(out)
    root.mkdir(parents=True, exist_ok=True)
    group = EncodeGroup.current()
    if group.is_main:
        _start_run(root, encoder, preprocess)
    group.barrier()
    index = _read_index(root) if (root / INDEX_NAME).exists() else {"version": INDEX_VERSION, "scans": {}}
    device = encoder.conv1.weight.device
    bf16 = autocast == "bf16" or (autocast == "auto" and device.type == "cuda")
    key = cache_key(encoder, preprocess, dtype, bf16)
    scans = scans_of(frame)
    todo = [s for s in scans if not same_key(index["scans"].get(s.scan_id, {}), key)]
    mine = process_slice(todo, group.rank, group.world)
    numbers = shard_numbers(_next_shard_number(root), group.rank, group.world)
    group.barrier()  # every process has its shard numbers before any shard is written
    chunks = [range(i, min(i + shard_size, len(mine))) for i in range(0, len(mine), shard_size)]
    batches = [list(chunk[j : j + batch_size]) for chunk in chunks for j in range(0, len(chunk), batch_size)]
    loader = scan_loader(mine, preprocess, batches, num_workers=num_workers, pin_memory=device.type == "cuda")
    entries = index["scans"] if group.world == 1 else {}
    failures: list[dict[str, str]] = []
    tokens: dict[str, torch.Tensor] = {}
    chunk_sizes = iter([len(chunk) for chunk in chunks])
    chunk_left, done = next(chunk_sizes, 0), 0
    with progress_bar(total=len(todo), desc="encode", unit="scan", enabled=progress and group.is_main) as bar:
        for batch in loader:
            stats.add(batch)
            for scan, reason in batch.failures:
                if strict:
                    raise CacheError(
                        f"{scan.image}: scan_id {scan.scan_id!r} failed to load ({reason}); --strict stops "
                        f"at the first failure (without it failures are skipped and listed in {ERRORS_NAME})"
                    )
                failures.append({"scan_id": scan.scan_id, "image": scan.image, "error": reason})
            if batch.volumes is not None:
                started = time.perf_counter()
                tokens.update(
                    encode_volumes(encoder, batch.volumes, [x.scan_id for x in batch.scans], dtype, bf16)
                )
                stats.encode_s += time.perf_counter() - started
            chunk_left -= len(batch.items)
            if chunk_left == 0:
                started = time.perf_counter()
                _finish_shard(
                    root, f"{SHARD_PREFIX}{next(numbers):05d}{SHARD_SUFFIX}", tokens, key, entries, group
                )
                stats.write_s += time.perf_counter() - started
                tokens, chunk_left = {}, next(chunk_sizes, 0)
            done += len(batch.items)
            _show_progress(root, group, bar, done, finished=False)
        write_part_errors(root, group.rank, failures)
        _show_progress(root, group, bar, done, finished=True)
        if group.is_main and group.world > 1:
            wait_for_all(root, group.world, lambda done: bar.update(done - bar.n))
    counts = {
        "encoded": len(mine) - len(failures),
        "skipped": len(scans) - len(todo),
        "failed": len(failures),
    }
    if group.is_main:
        failed = _finish_run(root, [s.scan_id for s in scans])
        counts.update(encoded=len(todo) - failed, failed=failed)
    stats.wall_s += time.perf_counter() - began
    return counts


def _start_run(root: Path, encoder: MerlinImageEncoder, preprocess: PreprocessConfig) -> None:
    """Main process, before the others read the index: drop temporary files, merge the part indices of a
    killed run into ``index.json``, forget the last run's errors, save the configs."""
    _remove_temporary_files(root)
    index = _read_index(root) if (root / INDEX_NAME).exists() else {"version": INDEX_VERSION, "scans": {}}
    if merge_part_indices(root, index["scans"]):
        _write_index(root, index)
    remove_parts(root)
    (root / ERRORS_NAME).unlink(missing_ok=True)
    save_config(encoder.config, root / "encoder.yaml")
    save_config(preprocess, root / "preprocess.yaml")


def encode_volumes(
    encoder: MerlinImageEncoder, volumes: torch.Tensor, scan_ids: list[str], dtype: str, bf16: bool = False
) -> dict[str, torch.Tensor]:
    """Tokens {scan_id: (T, C) in ``dtype``} of volumes (B, 1, H, W, D) on the CPU; refuses non-finite ones
    (also after the cast to ``dtype``)."""
    device = encoder.conv1.weight.device
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
        raw = encoder(volumes.to(device, non_blocking=True)).to(device="cpu", dtype=torch.float32)
    encoded = raw.to(STORAGE_DTYPES[dtype])
    tokens = {}
    for scan_id, raw_value, value in zip(scan_ids, raw, encoded):
        if not torch.isfinite(raw_value).all():
            raise CacheError(f"scan_id {scan_id!r}: the encoder's tokens are not finite (NaN or inf)")
        if not torch.isfinite(value).all():
            raise CacheError(
                f"scan_id {scan_id!r}: tokens are not finite in {dtype} (max |value| "
                f"{raw_value.abs().max().item():.3g} exceeds its range); store float32 or bfloat16"
            )
        tokens[scan_id] = value.clone(memory_format=torch.contiguous_format)
    return tokens


def _finish_shard(
    root: Path,
    shard_name: str,
    tokens: dict[str, torch.Tensor],
    key: dict[str, str],
    entries: dict[str, dict],
    group: EncodeGroup,
) -> None:
    """Write the shard, then the index that points at it: ``index.json`` in one process, else this
    process's part index. A shard whose scans all failed is not written."""
    if not tokens:
        return
    _write_shard(root / shard_name, tokens, key)
    for scan_id, value in tokens.items():
        entries[scan_id] = {"shard": shard_name, "shape": list(value.shape), **key}
    if group.world == 1:
        _write_index(root, {"version": INDEX_VERSION, "scans": entries})
    else:
        write_part_index(root, group.rank, entries)


def _show_progress(root: Path, group: EncodeGroup, bar: tqdm, done: int, *, finished: bool) -> None:
    """Advance the main process's bar to the scans handled by all processes (progress files if world > 1)."""
    if group.world > 1:
        write_progress(root, group.rank, done, finished)
        done = progress_of(root, group.world)[0] if group.is_main else done
    if group.is_main:
        bar.update(done - bar.n)


def _finish_run(root: Path, order: list[str]) -> int:
    """Main process, once every process has finished: merge the part indices and errors, delete the
    per-process files and unreferenced shards; the number of failed scans."""
    index = _read_index(root) if (root / INDEX_NAME).exists() else {"version": INDEX_VERSION, "scans": {}}
    if merge_part_indices(root, index["scans"]):
        _write_index(root, index)
    failures = merge_errors(root, order)
    remove_parts(root)
    _remove_unreferenced_shards(root, index["scans"])
    return len(failures)


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
        entry.setdefault("compute", UNRECORDED)
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
    """The ``.<name>.tmp`` files that a killed ``atomic_write`` leaves (shards, indices, progress)."""
    for path in root.glob(".*.tmp"):
        path.unlink()


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
    parser.add_argument("--num-workers", type=int, default=0, help="processes that load and resample scans")
    parser.add_argument("--strict", action="store_true", help="stop at the first scan that fails to load")
    parser.add_argument(
        "--autocast", choices=AUTOCAST_MODES, default="auto", help="bf16 autocast (auto: on a GPU only)"
    )
    parser.add_argument(
        "--device", help="default: this process's GPU under accelerate launch, else cuda or cpu"
    )
    args = parser.parse_args(argv)
    default_device = "cuda" if torch.cuda.is_available() else "cpu"
    device = args.device or (accelerate_state().device if launched() else default_device)
    encoder = build_encoder(args.encoder, args.encoder_config, args.checkpoint).to(device)
    preprocess = load_config(PreprocessConfig, args.preprocess_config) if args.preprocess_config else None
    counts = encode_manifest(
        args.manifest,
        args.out,
        encoder,
        preprocess,
        dtype=args.dtype,
        shard_size=args.shard_size,
        batch_size=args.batch_size,
        num_workers=args.num_workers,
        strict=args.strict,
        autocast=args.autocast,
    )
    if EncodeGroup.current().is_main:
        failed = (
            f", {counts['failed']} failed (see {Path(args.out) / ERRORS_NAME})" if counts["failed"] else ""
        )
        skipped = f"skipped {counts['skipped']} already cached"
        print(f"encoded {counts['encoded']} scans, {skipped}{failed} -> {args.out}")
    return 0
