"""Feature cache: encode once, skip on rerun, re-encode on key change, resume after a crash."""

from __future__ import annotations

import hashlib
import json
import pickle
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch.utils.data import DataLoader

from vlsurv.config import load_config, save_config
from vlsurv.data.transforms import PreprocessConfig, config_hash, preprocess_ct
from vlsurv.encoders import cache as cache_module
from vlsurv.encoders import scans as scans_module
from vlsurv.encoders.cache import CachedTokenDataset, CacheError, FeatureCache, encode_manifest, main
from vlsurv.encoders.merlin import EncoderConfig, MerlinImageEncoder
from vlsurv.encoders.provenance import cache_provenance

PREPROCESS = PreprocessConfig(spacing=(6.0, 6.0, 6.0), spatial_size=(64, 64, 32))
N_SCANS = 5


@pytest.fixture(scope="module")
def cohort(tmp_path_factory) -> Path:
    """Five small HU volumes and a manifest (relative image paths) without survival columns."""
    root = tmp_path_factory.mktemp("cohort")
    (root / "images").mkdir()
    rng = np.random.default_rng(0)
    rows = []
    for i in range(N_SCANS):
        volume = rng.normal(-400.0, 300.0, size=(40, 40, 20)).astype(np.float32)
        volume[10 + i : 20 + i, 12:22, 5:12] = 40.0
        nib.save(
            nib.Nifti1Image(volume, np.diag([7.0, 7.0, 6.5, 1.0])), str(root / "images" / f"s{i}.nii.gz")
        )
        rows.append(
            {
                "patient_id": f"p{i}",
                "scan_id": f"s{i}",
                "image": f"images/s{i}.nii.gz",
                "report": "",
                "split": "train",
            }
        )
    pd.DataFrame(rows).to_csv(root / "manifest.csv", index=False)
    return root


@pytest.fixture(scope="module")
def tiny() -> MerlinImageEncoder:
    return MerlinImageEncoder.tiny()


@pytest.fixture(scope="module")
def base_cache(cohort, tiny, tmp_path_factory) -> Path:
    """The cohort encoded once with the tiny encoder (float32, 2 scans per shard); tests copy it."""
    out = tmp_path_factory.mktemp("base") / "cache"
    _encode(cohort, out, tiny)
    return out


def _copy(base_cache: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(base_cache, tmp_path / "cache"))


def _encode(cohort: Path, out: Path, encoder: MerlinImageEncoder, **kw) -> dict[str, int]:
    kw.setdefault("shard_size", 2)
    return encode_manifest(
        cohort / "manifest.csv", out, encoder, kw.pop("preprocess", PREPROCESS), progress=False, **kw
    )


def _index(out: Path) -> dict:
    return json.loads((out / "index.json").read_text())["scans"]


def _shards(out: Path) -> list[str]:
    return sorted(p.name for p in out.glob("shard-*.safetensors"))


def test_encode_writes_shards_index_and_configs(cohort, tmp_path, tiny):
    out = tmp_path / "cache"
    assert _encode(cohort, out, tiny) == {"encoded": N_SCANS, "skipped": 0, "failed": 0}
    assert _shards(out) == ["shard-00000.safetensors", "shard-00001.safetensors", "shard-00002.safetensors"]
    entry = _index(out)["s3"]
    assert entry == {
        "shard": "shard-00001.safetensors",
        "shape": [4, 256],
        "dtype": "float32",
        "encoder": "i3resnet-1-1-1-1-w8",
        "token_mode": "mean_depth",
        "checkpoint_sha256": "random-init:0",
        "preprocess_hash": config_hash(PREPROCESS),
        "compute": "float32",
    }
    assert load_config(EncoderConfig, out / "encoder.yaml") == tiny.config
    assert load_config(PreprocessConfig, out / "preprocess.yaml") == PREPROCESS
    cache = FeatureCache(out)
    assert cache.scan_ids == [f"s{i}" for i in range(N_SCANS)] and "s4" in cache and "s9" not in cache
    assert cache.token_shape == (4, 256)
    expected = tiny(preprocess_ct(cohort / "images" / "s3.nii.gz", PREPROCESS)[None])[0]
    tokens = cache.get("s3")
    assert tokens.dtype == torch.float32 and torch.allclose(tokens, expected, atol=1e-5)
    assert not torch.allclose(tokens, cache.get("s2"))


def test_rerun_skips_cached_scans(cohort, tmp_path, tiny, base_cache):
    out = _copy(base_cache, tmp_path)
    stamps = {name: (out / name).stat().st_mtime_ns for name in _shards(out)}
    assert _encode(cohort, out, tiny) == {"encoded": 0, "skipped": N_SCANS, "failed": 0}
    assert {name: (out / name).stat().st_mtime_ns for name in _shards(out)} == stamps


@pytest.mark.parametrize("change", ["weights", "preprocess", "dtype", "token_mode", "compute"])
def test_changed_key_re_encodes_and_drops_stale_shards(cohort, tmp_path, tiny, change, base_cache):
    out = _copy(base_cache, tmp_path)
    encoder, kw = tiny, {}
    if change == "weights":
        encoder = MerlinImageEncoder.tiny(seed=1)
    elif change == "preprocess":
        kw["preprocess"] = PreprocessConfig(spacing=(6.0, 6.0, 6.0), spatial_size=(64, 64, 32), hu_min=-900.0)
    elif change == "dtype":
        kw["dtype"] = "float16"
    elif change == "compute":  # the same encoder under bfloat16 autocast
        kw["autocast"] = "bf16"
    else:
        encoder = MerlinImageEncoder.tiny(token_mode="global")
    assert _encode(cohort, out, encoder, **kw) == {"encoded": N_SCANS, "skipped": 0, "failed": 0}
    assert _shards(out) == ["shard-00003.safetensors", "shard-00004.safetensors", "shard-00005.safetensors"]
    assert {entry["shard"] for entry in _index(out).values()} == set(_shards(out))
    if change == "compute":
        assert {entry["compute"] for entry in _index(out).values()} == {"bfloat16"}
        assert cache_provenance(FeatureCache(out))["key"]["compute"] == "bfloat16"


def test_an_entry_without_its_compute_precision_is_read_and_kept(cohort, tmp_path, tiny, base_cache):
    """A cache written before ``compute`` was recorded: readable, not re-encoded, its precision unrecorded;
    once another precision is added beside it, the cache names the mix."""
    out = _copy(base_cache, tmp_path)
    index = json.loads((out / "index.json").read_text())
    for entry in index["scans"].values():
        del entry["compute"]
    (out / "index.json").write_text(json.dumps(index))
    assert FeatureCache(out).entry("s1")["compute"] == "unrecorded"
    assert cache_provenance(FeatureCache(out))["key"]["compute"] == "unrecorded"
    assert _encode(cohort, out, tiny) == {"encoded": 0, "skipped": N_SCANS, "failed": 0}
    index["scans"]["s0"]["compute"], index["scans"]["s1"]["compute"] = "float32", "bfloat16"
    (out / "index.json").write_text(json.dumps(index))
    with pytest.raises(CacheError, match=r"cache .*found precisions \['bfloat16', 'float32'\]; re-encode it"):
        cache_provenance(FeatureCache(out))


def test_interrupted_run_resumes_without_half_written_shards(cohort, tmp_path, tiny, monkeypatch):
    out = tmp_path / "cache"
    calls = []

    def failing_preprocess(path, cfg):
        calls.append(path)
        if len(calls) == 3:
            raise RuntimeError("simulated crash while encoding the third scan")
        return preprocess_ct(path, cfg)

    monkeypatch.setattr(scans_module, "preprocess_ct", failing_preprocess)
    with pytest.raises(RuntimeError, match="simulated crash"):
        _encode(cohort, out, tiny)
    assert sorted(_index(out)) == ["s0", "s1"]
    assert _shards(out) == ["shard-00000.safetensors"]
    assert not list(out.glob(".*.tmp"))
    monkeypatch.undo()
    assert _encode(cohort, out, tiny) == {"encoded": 3, "skipped": 2, "failed": 0}
    cache = FeatureCache(out)
    assert len(cache) == N_SCANS and cache.get("s4").shape == (4, 256)


def test_crash_between_shard_and_index_leaves_a_clean_cache(cohort, tmp_path, tiny, monkeypatch):
    out = tmp_path / "cache"
    real_write_index = cache_module._write_index

    def crash_after_second_shard(root, index):
        if len(index["scans"]) == 4:
            (root / ".shard-00002.safetensors.tmp").write_bytes(b"partial")  # as a kill mid-write would leave
            raise KeyboardInterrupt
        real_write_index(root, index)

    monkeypatch.setattr(cache_module, "_write_index", crash_after_second_shard)
    with pytest.raises(KeyboardInterrupt):
        _encode(cohort, out, tiny)
    assert sorted(_index(out)) == ["s0", "s1"]
    monkeypatch.undo()
    assert _encode(cohort, out, tiny) == {"encoded": 3, "skipped": 2, "failed": 0}
    assert _shards(out) == ["shard-00000.safetensors", "shard-00002.safetensors", "shard-00003.safetensors"]
    assert not list(out.glob(".*.tmp"))
    assert FeatureCache(out).get("s2").shape == (4, 256)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_half_precision_storage(cohort, tmp_path, tiny, dtype, base_cache):
    out32, out16 = base_cache, tmp_path / dtype
    _encode(cohort, out16, tiny, dtype=dtype)
    shard = out16 / _index(out16)["s0"]["shard"]
    with safe_open(str(shard), framework="pt") as handle:
        assert handle.get_tensor("s0").dtype == getattr(torch, dtype)
    assert shard.stat().st_size < (out32 / "shard-00000.safetensors").stat().st_size * 0.6
    reference, tokens = FeatureCache(out32).get("s0"), FeatureCache(out16).get("s0")
    assert tokens.dtype == torch.float32
    assert torch.allclose(tokens, reference, rtol=1e-2, atol=1e-2)


def test_float16_overflow_is_refused(cohort, tmp_path):
    loud = MerlinImageEncoder.tiny()
    loud.conv1.weight.mul_(1e6)
    with pytest.raises(
        CacheError, match=r"scan_id 's0': tokens are not finite in float16 .*store float32 or bfloat16"
    ):
        _encode(cohort, tmp_path / "cache", loud, dtype="float16")


def test_unknown_scan_missing_shard_and_missing_index_are_named(tmp_path, base_cache):
    out = _copy(base_cache, tmp_path)
    cache = FeatureCache(out)
    with pytest.raises(CacheError, match=r"scan_id 'nope' is not in the feature cache .* \(5 scans cached\)"):
        cache.get("nope")
    with pytest.raises(CacheError, match=r"2 requested scans are not cached \(first: \['x', 'y'\]\)"):
        CachedTokenDataset(cache, ["s0", "x", "y"])
    (out / "shard-00001.safetensors").unlink()
    with pytest.raises(
        CacheError,
        match=r"index\.json: scan_id 's2' points at shard shard-00001\.safetensors, "
        r"which does not exist",
    ):
        FeatureCache(out)
    with pytest.raises(CacheError, match=r"empty: index\.json does not exist"):
        FeatureCache(tmp_path / "empty")
    (out / "index.json").write_text('{"version": 1, "scans": {"s0": {"shard": "shard-00000.safetensors"}}}')
    with pytest.raises(CacheError, match=r"entry for scan_id 's0' lacks field 'shape'"):
        FeatureCache(out)


def test_dataset_batches_and_survives_pickling(base_cache):
    cache = FeatureCache(base_cache)
    cache.get("s0")
    copy = pickle.loads(pickle.dumps(cache))
    assert torch.equal(copy.get("s0"), cache.get("s0"))
    batch = next(iter(DataLoader(CachedTokenDataset(cache, ["s4", "s1", "s2"]), batch_size=3)))
    assert batch["scan_id"] == ["s4", "s1", "s2"]
    assert batch["image_tokens"].shape == (3, 4, 256)
    assert torch.equal(batch["image_tokens"][1], cache.get("s1"))


def test_cli_tiny_encoder_config_and_checkpoint(cohort, tmp_path, tiny, capsys):
    preprocess_yaml = save_config(PREPROCESS, tmp_path / "preprocess.yaml")
    common = [
        "--manifest",
        str(cohort / "manifest.csv"),
        "--preprocess-config",
        str(preprocess_yaml),
        "--shard-size",
        "4",
        "--batch-size",
        "2",
        "--device",
        "cpu",
    ]
    assert main([*common, "--out", str(tmp_path / "a"), "--encoder", "tiny", "--dtype", "bfloat16"]) == 0
    assert "encoded 5 scans, skipped 0" in capsys.readouterr().out
    assert (
        _index(tmp_path / "a")["s4"]["dtype"] == "bfloat16"
        and _shards(tmp_path / "a")[-1] == "shard-00001.safetensors"
    )

    global_yaml = save_config(
        EncoderConfig(layers=(1, 1, 1, 1), base_width=8, token_mode="global"), tmp_path / "e.yaml"
    )
    assert main([*common, "--out", str(tmp_path / "b"), "--encoder-config", str(global_yaml)]) == 0
    assert FeatureCache(tmp_path / "b").token_shape == (1, 256)

    checkpoint = tmp_path / "tiny.safetensors"
    save_file(tiny.state_dict(), str(checkpoint))
    assert (
        main([*common, "--out", str(tmp_path / "c"), "--encoder", "tiny", "--checkpoint", str(checkpoint)])
        == 0
    )
    assert (
        _index(tmp_path / "c")["s0"]["checkpoint_sha256"]
        == hashlib.sha256(checkpoint.read_bytes()).hexdigest()
    )
    from_checkpoint, random_init = (
        FeatureCache(tmp_path / "c").get("s0"),
        FeatureCache(tmp_path / "a").get("s0"),
    )
    assert torch.allclose(from_checkpoint, random_init, rtol=2e-2, atol=2e-2)  # same weights, bf16 vs fp32


def test_bad_arguments_are_refused(cohort, tmp_path, tiny):
    with pytest.raises(
        CacheError, match=r"dtype: expected one of \['float32', 'float16', 'bfloat16'\], got 'int8'"
    ):
        _encode(cohort, tmp_path / "cache", tiny, dtype="int8")
    with pytest.raises(
        CacheError, match=r"manifest: expected columns scan_id and image, missing \['image'\]"
    ):
        encode_manifest(
            pd.DataFrame({"scan_id": ["a"]}), tmp_path / "cache", tiny, PREPROCESS, progress=False
        )
