"""`vlsurv encode` through DataLoader workers: the same tokens as in-process loading, failed scans recorded
and skipped (or, with strict, the first one stops the run), one progress bar with a rate and an ETA."""

from __future__ import annotations

import gzip
import json
import re
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
import torch

from vlsurv.data.transforms import PreprocessConfig
from vlsurv.encoders.cache import CacheError, FeatureCache, encode_manifest, main
from vlsurv.encoders.merlin import MerlinImageEncoder
from vlsurv.encoders.parallel import process_slice
from vlsurv.encoders.scans import MAIN_PROCESS, EncodeStats

PREPROCESS = PreprocessConfig(spacing=(6.0, 6.0, 6.0), spatial_size=(64, 64, 32))


def write_cohort(root: Path, n: int, broken: dict[int, bytes] | None = None) -> Path:
    """``n`` small HU volumes and a manifest; ``broken`` {row: bytes} replaces those files' content."""
    (root / "images").mkdir(parents=True)
    rng = np.random.default_rng(0)
    rows = []
    for i in range(n):
        volume = rng.normal(-400.0, 300.0, size=(40, 40, 20)).astype(np.float32)
        volume[10 + i : 20 + i, 12:22, 5:12] = 40.0
        image = root / "images" / f"s{i}.nii.gz"
        nib.save(nib.Nifti1Image(volume, np.diag([7.0, 7.0, 6.5, 1.0])), str(image))
        if broken and i in broken:
            image.write_bytes(broken[i])
        rows.append({"patient_id": f"p{i}", "scan_id": f"s{i}", "image": str(image), "split": "train"})
    pd.DataFrame(rows).to_csv(root / "manifest.csv", index=False)
    return root / "manifest.csv"


def tokens_of(cache: Path) -> dict[str, torch.Tensor]:
    features = FeatureCache(cache)
    return {scan_id: features.get(scan_id) for scan_id in features.scan_ids}


@pytest.fixture(scope="module")
def tiny() -> MerlinImageEncoder:
    return MerlinImageEncoder.tiny()


def test_slices_are_disjoint_contiguous_and_cover_everything():
    items = list(range(11))
    slices = [process_slice(items, rank, 3) for rank in range(3)]
    assert slices == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 10]]
    assert process_slice(items[:1], 1, 2) == [] and process_slice(items, 0, 1) == items


def test_two_workers_give_the_tokens_of_in_process_loading(tmp_path, tiny):
    manifest = write_cohort(tmp_path / "cohort", 4)
    serial = encode_manifest(manifest, tmp_path / "serial", tiny, PREPROCESS, shard_size=2, progress=False)
    stats = EncodeStats()
    workers = encode_manifest(
        manifest,
        tmp_path / "workers",
        tiny,
        PREPROCESS,
        shard_size=2,
        num_workers=2,
        progress=False,
        stats=stats,
    )
    assert serial == workers == {"encoded": 4, "skipped": 0, "failed": 0}
    reference, loaded = tokens_of(tmp_path / "serial"), tokens_of(tmp_path / "workers")
    assert loaded.keys() == reference.keys()
    assert all(torch.equal(loaded[s], reference[s]) for s in reference)
    assert json.loads((tmp_path / "workers" / "index.json").read_text()) == json.loads(
        (tmp_path / "serial" / "index.json").read_text()
    )
    assert set(stats.peak_rss_mb) == {0, 1} and MAIN_PROCESS not in stats.peak_rss_mb  # loaded in 2 workers
    assert stats.scans == 4 and stats.load_s > 0 and stats.resample_s > 0 and stats.encode_s > 0

    batched = encode_manifest(
        manifest, tmp_path / "batched", tiny, PREPROCESS, batch_size=3, num_workers=2, progress=False
    )
    assert batched["encoded"] == 4
    for scan_id, value in tokens_of(tmp_path / "batched").items():  # batched convolutions round differently
        torch.testing.assert_close(value, reference[scan_id], rtol=1e-5, atol=1e-5)


BROKEN = {1: b"not a NIfTI file", 3: gzip.compress(b"\x00" * 100)}


def test_failed_scans_are_recorded_and_skipped(tmp_path, tiny, capsys):
    manifest = write_cohort(tmp_path / "cohort", 5, BROKEN)
    out = tmp_path / "cache"
    counts = encode_manifest(manifest, out, tiny, PREPROCESS, shard_size=2, num_workers=2, progress=False)
    assert counts == {"encoded": 3, "skipped": 0, "failed": 2}
    assert FeatureCache(out).scan_ids == ["s0", "s2", "s4"]
    errors = [json.loads(line) for line in (out / "errors.jsonl").read_text().splitlines()]
    assert [e["scan_id"] for e in errors] == ["s1", "s3"]
    assert (
        errors[0]["image"].endswith("s1.nii.gz") and "s1.nii.gz: cannot read NIfTI file" in errors[0]["error"]
    )
    assert errors[1]["error"].startswith("CTError: ") and "s3.nii.gz" in errors[1]["error"]

    write_cohort(tmp_path / "fixed", 5)  # the files repaired: a rerun encodes only the two failed scans
    for i in BROKEN:
        (tmp_path / "cohort" / "images" / f"s{i}.nii.gz").write_bytes(
            (tmp_path / "fixed" / "images" / f"s{i}.nii.gz").read_bytes()
        )
    assert main(["--manifest", str(manifest), "--out", str(out), "--encoder", "tiny", "--device", "cpu",
                 "--preprocess-config", str(_preprocess_yaml(tmp_path))]) == 0  # fmt: skip
    assert "encoded 2 scans, skipped 3 already cached -> " in capsys.readouterr().out
    assert not (out / "errors.jsonl").exists() and len(FeatureCache(out)) == 5


def _preprocess_yaml(tmp_path: Path) -> Path:
    from vlsurv.config import save_config

    return save_config(PREPROCESS, tmp_path / "preprocess.yaml")


def test_strict_stops_at_the_first_failure(tmp_path, tiny, capsys):
    manifest = write_cohort(tmp_path / "cohort", 5, BROKEN)
    with pytest.raises(
        CacheError,
        match=r"s1\.nii\.gz: scan_id 's1' failed to load \(CTError: .*s1\.nii\.gz: cannot read NIfTI file"
        r".*\); --strict stops at the first failure",
    ):
        encode_manifest(
            manifest, tmp_path / "cache", tiny, PREPROCESS, shard_size=1, strict=True, progress=False
        )
    assert FeatureCache(tmp_path / "cache").scan_ids == ["s0"]  # the shard before the failure is kept

    args = ["--manifest", str(manifest), "--encoder", "tiny", "--device", "cpu", "--num-workers", "1"]
    args += ["--preprocess-config", str(_preprocess_yaml(tmp_path))]
    assert main([*args, "--out", str(tmp_path / "lenient")]) == 0
    assert "encoded 3 scans, skipped 0 already cached, 2 failed (see " in capsys.readouterr().out

    from vlsurv.cli import main as cli

    assert cli(["encode", *args, "--out", str(tmp_path / "strict"), "--strict"]) == 2
    assert "vlsurv encode: error: " in capsys.readouterr().err


def test_one_progress_bar_with_rate_and_eta(tmp_path, tiny, capsys):
    manifest = write_cohort(tmp_path / "cohort", 3)
    encode_manifest(manifest, tmp_path / "cache", tiny, PREPROCESS, num_workers=1)
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("encode:")]
    assert lines and re.search(r"3/3 \[[0-9:]+<00:00, +[0-9.]+(scan/s|s/scan)\]$", lines[-1])  # rate, ETA 0
    assert re.search(r" 0/3 \[00:00<\?, \?scan/s\]$", lines[0])  # no rate nor ETA before the first scan


def test_bad_worker_count_and_autocast_are_refused(tmp_path, tiny):
    manifest = write_cohort(tmp_path / "cohort", 1)
    with pytest.raises(CacheError, match=r"num_workers: expected an integer >= 0, got -1"):
        encode_manifest(manifest, tmp_path / "cache", tiny, PREPROCESS, num_workers=-1)
    with pytest.raises(CacheError, match=r"autocast: expected one of \['auto', 'bf16', 'off'\], got 'fp8'"):
        encode_manifest(manifest, tmp_path / "cache", tiny, PREPROCESS, autocast="fp8")


def test_bf16_autocast_changes_the_arithmetic_not_the_tokens(tmp_path, tiny):
    manifest = write_cohort(tmp_path / "cohort", 2)
    for autocast in ("off", "bf16"):
        encode_manifest(manifest, tmp_path / autocast, tiny, PREPROCESS, autocast=autocast, progress=False)
    exact, bf16 = tokens_of(tmp_path / "off"), tokens_of(tmp_path / "bf16")
    assert all(value.dtype == torch.float32 for value in bf16.values())
    assert not all(torch.equal(bf16[s], exact[s]) for s in exact)  # the convolutions ran in bf16
    for scan_id, value in exact.items():
        torch.testing.assert_close(bf16[scan_id], value, rtol=0.05, atol=0.05 * value.abs().max().item())
