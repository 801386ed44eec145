"""Scans for ``vlsurv encode``: a torch Dataset that loads and preprocesses one scan per item, and its loader.

``scans_of(frame)`` -> [``Scan``] (scan_id, image path, the manifest's ``ScanOverrides``).
``ScanDataset(scans, preprocess)[i]`` -> ``ScanItem``: the volume float32 (1, H, W, D) from ``load_ct`` (with
the overrides) and ``preprocess_ct``, or ``error`` (the reason) when the scan fails to load: an ``InputError``
or ``OSError`` anywhere in the exception's cause chain. Any other exception is a bug and propagates.
``scan_loader(...)`` is a ``DataLoader`` over given batches of indices (never across a shard), in order, with
``num_workers`` processes that load and resample while the encoder runs, and ``collate_scans`` ->
``ScanBatch``: ``volumes`` (B, 1, H, W, D) of the loaded scans (B may be 0) and ``failures``.
``EncodeStats`` adds up the seconds per stage and the peak memory of each loading process.
"""

from __future__ import annotations

import os
import resource
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
import torch
from torch.utils.data import DataLoader, Dataset, get_worker_info

from vlsurv.data.ct import ScanOverrides, load_ct
from vlsurv.data.manifest import scan_overrides
from vlsurv.data.transforms import PreprocessConfig, preprocess_ct
from vlsurv.errors import InputError

MAIN_PROCESS = -1  # worker id of items loaded in the main process (num_workers=0)


@dataclass(frozen=True)
class Scan:
    """One manifest row to encode: ``scan_id``, ``image`` path and per-scan ``overrides``."""

    scan_id: str
    image: str
    overrides: ScanOverrides = ScanOverrides()


@dataclass
class ScanItem:
    """A loaded scan: ``volume`` (1, H, W, D) float32, or None with ``error`` set; seconds and memory."""

    scan: Scan
    volume: torch.Tensor | None
    error: str | None
    load_s: float
    resample_s: float
    worker: int
    peak_rss_mb: float
    added_rss_mb: float


@dataclass
class ScanBatch:
    """``scans`` loaded (B), ``volumes`` (B, 1, H, W, D) or None when B = 0, ``failures`` [(Scan, reason)]."""

    scans: list[Scan]
    volumes: torch.Tensor | None
    failures: list[tuple[Scan, str]]
    items: list[ScanItem]

    def pin_memory(self) -> ScanBatch:
        """The DataLoader's pinning hook: page-locked ``volumes`` for an asynchronous copy to the GPU."""
        volumes = None if self.volumes is None else self.volumes.pin_memory()
        return ScanBatch(self.scans, volumes, self.failures, self.items)


def scans_of(frame: pd.DataFrame) -> list[Scan]:
    """A ``Scan`` per manifest row (``scan_id``, ``image`` and the optional override columns)."""
    return [
        Scan(str(row["scan_id"]), str(row["image"]), ScanOverrides(**scan_overrides(row)))
        for row in frame.to_dict("records")
    ]


def load_failure(error: BaseException) -> BaseException | None:
    """The ``InputError`` or ``OSError`` in ``error``'s cause chain (MONAI wraps errors), else None."""
    seen: BaseException | None = error
    while seen is not None:
        if isinstance(seen, (InputError, OSError)):
            return seen
        seen = seen.__cause__ or seen.__context__
    return None


def _rss_mb() -> float:
    """Resident memory of this process now (MiB)."""
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


class ScanDataset(Dataset):
    """Items ``ScanItem`` for ``scans``: ``load_ct`` with the scan's overrides, then ``preprocess_ct``."""

    def __init__(self, scans: Sequence[Scan], preprocess: PreprocessConfig) -> None:
        self.scans = list(scans)
        self.preprocess = preprocess
        self.start_rss_mb = _rss_mb()

    def __len__(self) -> int:
        return len(self.scans)

    def __getitem__(self, item: int) -> ScanItem:
        scan = self.scans[item]
        volume, error, loaded, start = None, None, None, time.perf_counter()
        try:
            ct = load_ct(Path(scan.image), scan.overrides)
            loaded = time.perf_counter()
            volume = preprocess_ct(ct, self.preprocess)
        except Exception as raised:  # a scan that fails to load is recorded; anything else is a bug
            cause = load_failure(raised)
            if cause is None:
                raise
            error = f"{type(cause).__name__}: {cause}"
        end = time.perf_counter()
        loaded = end if loaded is None else loaded
        worker = get_worker_info()
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        return ScanItem(
            scan=scan,
            volume=volume,
            error=error,
            load_s=loaded - start,
            resample_s=end - loaded,
            worker=MAIN_PROCESS if worker is None else worker.id,
            peak_rss_mb=peak,
            added_rss_mb=peak - self.start_rss_mb,
        )


def _record_start_memory(_: int) -> None:
    """worker_init_fn: a worker's added memory counts from its own start (after the fork)."""
    get_worker_info().dataset.start_rss_mb = _rss_mb()


def collate_scans(items: list[ScanItem]) -> ScanBatch:
    """Stack the loaded volumes to (B, 1, H, W, D); failed scans go to ``failures``."""
    loaded = [item for item in items if item.volume is not None]
    volumes = torch.stack([item.volume for item in loaded]) if loaded else None
    failures = [(item.scan, item.error) for item in items if item.volume is None]
    return ScanBatch([item.scan for item in loaded], volumes, failures, items)


def scan_loader(
    scans: Sequence[Scan],
    preprocess: PreprocessConfig,
    batches: Sequence[Sequence[int]],
    *,
    num_workers: int = 0,
    pin_memory: bool = False,
    prefetch_factor: int = 2,
) -> DataLoader:
    """``ScanBatch`` per entry of ``batches`` (indices into ``scans``), in order; workers prefetch
    ``prefetch_factor`` batches each."""
    return DataLoader(
        ScanDataset(scans, preprocess),
        batch_sampler=[list(batch) for batch in batches],
        num_workers=num_workers,
        collate_fn=collate_scans,
        pin_memory=pin_memory,
        prefetch_factor=prefetch_factor if num_workers > 0 else None,
        worker_init_fn=_record_start_memory if num_workers > 0 else None,
    )


@dataclass
class EncodeStats:
    """Filled by ``encode_manifest``: scans seen, seconds per stage (load and resample summed over the
    loading processes; encode and write in the main loop; wall for the run) and per-process peak memory
    (MiB: ``peak_rss_mb`` includes pages shared with the parent, ``added_rss_mb`` counts from the worker's
    start; key ``MAIN_PROCESS`` = -1 when loading runs in the main process)."""

    scans: int = 0
    failed: int = 0
    load_s: float = 0.0
    resample_s: float = 0.0
    encode_s: float = 0.0
    write_s: float = 0.0
    wall_s: float = 0.0
    peak_rss_mb: dict[int, float] = field(default_factory=dict)
    added_rss_mb: dict[int, float] = field(default_factory=dict)

    def add(self, batch: ScanBatch) -> None:
        """Count the items of one batch."""
        for item in batch.items:
            self.scans += 1
            self.failed += item.volume is None
            self.load_s += item.load_s
            self.resample_s += item.resample_s
            self.peak_rss_mb[item.worker] = max(self.peak_rss_mb.get(item.worker, 0.0), item.peak_rss_mb)
            self.added_rss_mb[item.worker] = max(self.added_rss_mb.get(item.worker, 0.0), item.added_rss_mb)
