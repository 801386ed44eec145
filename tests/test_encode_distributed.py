"""`accelerate launch -m vlsurv.cli encode` on 2 CPU processes: the merged cache equals the one-process cache
tensor for tensor; a run whose process dies mid-way leaves only complete shards, and a rerun with another
process count reuses them."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import pytest
import torch
from conftest import launch_on_two_cpu_processes
from test_encode_parallel import PREPROCESS, tokens_of, write_cohort

from vlsurv.config import save_config
from vlsurv.encoders.cache import encode_manifest
from vlsurv.encoders.merlin import MerlinImageEncoder

N_SCANS = 6


def launch_encode(manifest: Path, out: Path, *options: str) -> str:
    """`accelerate launch ... -m vlsurv.cli encode` with the tiny encoder on 2 CPU processes; its stderr."""
    preprocess = save_config(PREPROCESS, out.parent / "preprocess.yaml")
    arguments = ["encode", "--manifest", str(manifest), "--out", str(out), "--encoder", "tiny"]
    arguments += ["--preprocess-config", str(preprocess), "--device", "cpu", "--shard-size", "1", *options]
    runs = []

    def run_and_keep(*args, **kwargs):
        runs.append(real_run(*args, **kwargs))
        return runs[-1]

    real_run = subprocess.run
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(subprocess, "run", run_and_keep)
        launch_on_two_cpu_processes("--module", "vlsurv.cli", *arguments)
    return runs[-1].stderr


@pytest.fixture(scope="module")
def one_process(tmp_path_factory) -> tuple[Path, dict[str, torch.Tensor]]:
    """The cohort's manifest and its tokens encoded by one unlaunched process."""
    root = tmp_path_factory.mktemp("one")
    manifest = write_cohort(root / "cohort", N_SCANS)
    encode_manifest(manifest, root / "cache", MerlinImageEncoder.tiny(), PREPROCESS, progress=False)
    return manifest, tokens_of(root / "cache")


@pytest.mark.distributed
def test_two_processes_merge_into_the_one_process_cache(one_process, tmp_path):
    manifest, reference = one_process
    out = tmp_path / "cache"
    bars = [
        line for line in launch_encode(manifest, out, "--num-workers", "1").splitlines() if "encode:" in line
    ]
    assert bars and all("/6 [" in line for line in bars)  # one bar, over both processes' scans
    assert re.search(r"6/6 \[.*(scan/s|s/scan)\]$", bars[-1]) and sum("6/6" in line for line in bars) == 1
    merged = tokens_of(out)
    assert list(merged) == list(reference)
    # equal up to float rounding: the processes' conv kernels may split their sums otherwise than the one
    # process does (9e-8 on tokens of size 0.3 on one machine, bit-equal on another)
    for scan_id in reference:
        torch.testing.assert_close(merged[scan_id], reference[scan_id], rtol=1e-5, atol=1e-6)
    index = json.loads((out / "index.json").read_text())["scans"]
    first_process = {index[f"s{i}"]["shard"] for i in range(3)}  # shards 0, 2, 4; the second one's 1, 3, 5
    assert first_process == {f"shard-{n:05d}.safetensors" for n in (0, 2, 4)}
    assert sorted(p.name for p in out.iterdir() if not p.name.startswith("shard-")) == [
        "encoder.yaml",
        "index.json",
        "preprocess.yaml",
    ]  # the per-process files are gone after the merge


@pytest.mark.distributed
def test_a_dead_process_leaves_whole_shards_that_another_process_count_reuses(one_process, tmp_path):
    reference = one_process[1]
    manifest = write_cohort(tmp_path / "cohort", N_SCANS)
    image = tmp_path / "cohort" / "images" / "s4.nii.gz"
    good = image.read_bytes()
    image.write_bytes(b"broken")  # with --strict the second process stops at s4; the launcher ends the first
    out = tmp_path / "cache"
    with pytest.raises(AssertionError, match=r"scan_id 's4' failed to load .*--strict stops"):
        launch_encode(manifest, out, "--strict")
    image.write_bytes(good)
    assert not (out / "index.json").exists()  # nothing merged: the run did not finish
    done = json.loads((out / "index-part-00001.json").read_text())
    assert sorted(done) == ["s3"] and (out / done["s3"]["shard"]).is_file()
    (out / ".shard-00009.safetensors.tmp").write_bytes(b"partial")  # what a kill during a write leaves

    counts = encode_manifest(manifest, out, MerlinImageEncoder.tiny(), PREPROCESS, progress=False)
    assert counts["skipped"] >= 1 and counts["encoded"] + counts["skipped"] == N_SCANS
    assert json.loads((out / "index.json").read_text())["scans"]["s3"]["shard"] == done["s3"]["shard"]
    resumed = tokens_of(out)
    assert list(resumed) == list(reference)
    for scan_id in reference:
        torch.testing.assert_close(resumed[scan_id], reference[scan_id], rtol=1e-5, atol=1e-6)
    assert not list(out.glob(".*.tmp")) and not list(out.glob("index-part-*"))
