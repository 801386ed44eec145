"""Many processes on one feature cache: slices of the manifest, per-process files, and their merge.

Under ``accelerate launch`` (any launcher accelerate supports: torchrun, SLURM, several nodes on a shared
folder) ``EncodeGroup.current()`` gives this process's ``rank`` of ``world``; a plain run is rank 0 of 1.
Process ``rank`` encodes ``process_slice(todo, rank, world)``, a contiguous block of the scans left to
encode in manifest order, and numbers its k-th shard ``first + rank + k * world``, so names never clash.
While it runs it keeps, in the cache folder, each replaced atomically:

- ``index-part-<rank>.json``: its index entries for the shards it has completed (world > 1);
- ``progress-<rank>.json``: ``{"done": scans handled, "finished": bool}``, read by the main process's bar;
- ``errors-part-<rank>.jsonl``: written at its end, one ``{"scan_id", "image", "error"}`` per failed scan.

The main process merges the part indices into ``index.json`` (one atomic replace) at the end of a run, and
at the start of the next one, so the shards of a killed run are reused whatever the new process count.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from vlsurv.files import atomic_write

T = TypeVar("T")
PART_INDEX, PROGRESS, PART_ERRORS = "index-part-", "progress-", "errors-part-"
ERRORS_NAME = "errors.jsonl"
POLL_S = 0.2
WORLD_SIZE_VARIABLES = ("WORLD_SIZE", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE")


@dataclass
class EncodeGroup:
    """This process's place: ``rank`` of ``world`` processes; ``barrier`` waits for all of them."""

    rank: int = 0
    world: int = 1
    state: object | None = None

    @classmethod
    def current(cls) -> EncodeGroup:
        """The group ``accelerate launch`` set up (accelerate's ``PartialState``), else one process (then
        accelerate's state is left untouched, for a later ``Accelerator`` in the same process)."""
        if not launched():
            return cls()
        state = accelerate_state()
        return cls(rank=state.process_index, world=state.num_processes, state=state)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.state is not None:
            self.state.wait_for_everyone()


def launched() -> bool:
    """Whether a launcher started several processes (the world-size variables accelerate reads)."""
    from accelerate.utils import get_int_from_env

    return get_int_from_env(WORLD_SIZE_VARIABLES, 1) > 1


def accelerate_state():
    """accelerate's ``PartialState``: one GPU per process, or gloo over CPU processes on a machine without
    GPUs (``accelerate launch --multi_gpu`` starts them; without ``cpu=True`` each thinks it is alone)."""
    import torch
    from accelerate import PartialState

    return PartialState(cpu=not torch.cuda.is_available())


def process_slice(items: Sequence[T], rank: int, world: int) -> list[T]:
    """Contiguous block ``rank`` of ``world`` near-equal blocks of ``items`` (the first ones one longer)."""
    size, extra = divmod(len(items), world)
    start = rank * size + min(rank, extra)
    return list(items[start : start + size + (rank < extra)])


def shard_numbers(first: int, rank: int, world: int) -> Iterator[int]:
    """``first + rank``, ``first + rank + world``, ...: this process's shard numbers."""
    number = first + rank
    while True:
        yield number
        number += world


def _write_json(path: Path, value: object) -> None:
    atomic_write(path, json.dumps(value, indent=1, sort_keys=True).encode())


def write_part_index(root: Path, rank: int, entries: dict[str, dict]) -> None:
    """This process's entries for its completed shards."""
    _write_json(root / f"{PART_INDEX}{rank:05d}.json", entries)


def write_progress(root: Path, rank: int, done: int, finished: bool) -> None:
    _write_json(root / f"{PROGRESS}{rank:05d}.json", {"done": done, "finished": finished})


def write_part_errors(root: Path, rank: int, failures: list[dict[str, str]]) -> None:
    atomic_write(
        root / f"{PART_ERRORS}{rank:05d}.jsonl", "".join(json.dumps(f) + "\n" for f in failures).encode()
    )


def _parts(root: Path, prefix: str) -> list[Path]:
    return sorted(root.glob(f"{prefix}[0-9]*.json*"))


def merge_part_indices(root: Path, entries: dict[str, dict]) -> bool:
    """Add every ``index-part-*.json`` to ``entries``; whether there were any. The caller then writes the
    merged index (one atomic replace) and only after it deletes the parts (``remove_parts``)."""
    parts = _parts(root, PART_INDEX)
    for path in parts:
        entries.update(json.loads(path.read_text()))
    return bool(parts)


def remove_parts(root: Path) -> None:
    """Delete the per-process files (after their merge)."""
    for prefix in (PART_INDEX, PROGRESS, PART_ERRORS):
        for path in _parts(root, prefix):
            path.unlink()


def progress_of(root: Path, world: int) -> tuple[int, bool]:
    """(scans done by all processes, whether all have finished) from their progress files."""
    done, finished = 0, True
    for rank in range(world):
        path = root / f"{PROGRESS}{rank:05d}.json"
        state = json.loads(path.read_text()) if path.is_file() else {"done": 0, "finished": False}
        done, finished = done + state["done"], finished and state["finished"]
    return done, finished


def wait_for_all(root: Path, world: int, on_progress) -> None:
    """Poll the progress files until every process has finished, calling ``on_progress(done)``."""
    while True:
        done, finished = progress_of(root, world)
        on_progress(done)
        if finished:
            return
        time.sleep(POLL_S)


def merge_errors(root: Path, order: Sequence[str]) -> list[dict[str, str]]:
    """All processes' failures in manifest ``order``, written to ``errors.jsonl`` (removed when none)."""
    failures = [
        json.loads(line) for path in _parts(root, PART_ERRORS) for line in path.read_text().splitlines()
    ]
    position = {scan_id: i for i, scan_id in enumerate(order)}
    failures.sort(key=lambda f: position.get(f["scan_id"], len(position)))
    if failures:
        atomic_write(root / ERRORS_NAME, "".join(json.dumps(f) + "\n" for f in failures).encode())
    else:
        (root / ERRORS_NAME).unlink(missing_ok=True)
    return failures
