"""Benchmark: a training step that reads cached tokens vs one that runs the full Merlin encoder.

Both steps share the same tail: tokens (1, 49, 2048) -> linear projector (2048 -> d_model) ->
MSE loss -> backward -> AdamW step. The encoder step first runs the full-size
MerlinImageEncoder (I3D ResNet-152, random init) on a (1, 1, 224, 224, 160) volume; the cached
step reads the tokens that `encode_manifest` wrote for the same volume. Prints the seconds per
scan of the encoder and the ratio of the two step times on this machine.

    python benchmarks/encoder_cache.py [--device cpu|cuda] [--cached-steps 20]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import torch
from torch import nn

from vlsurv.data.transforms import PreprocessConfig
from vlsurv.encoders.cache import FeatureCache, encode_manifest
from vlsurv.encoders.merlin import MerlinImageEncoder

SHAPE = (224, 224, 160)
SPACING = (1.5, 1.5, 3.0)


def write_volume(path: Path, seed: int = 0) -> Path:
    """A HU volume already at Merlin's size and spacing (RAS affine), so preprocessing is light."""
    rng = np.random.default_rng(seed)
    volume = rng.normal(-300.0, 400.0, size=SHAPE).astype(np.float32)
    nib.save(nib.Nifti1Image(volume, np.diag([*SPACING, 1.0])), str(path))
    return path


def timed(fn: Callable[[], object], device: torch.device) -> float:
    """Wall seconds of ``fn()``, synchronising the GPU around it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--d-model", type=int, default=4096, help="decoder width the projector maps to")
    parser.add_argument("--cached-steps", type=int, default=20)
    args = parser.parse_args(argv)
    device = torch.device(args.device)

    build_seconds = time.perf_counter()
    encoder = MerlinImageEncoder().to(device)
    build_seconds = time.perf_counter() - build_seconds
    projector = nn.Linear(encoder.out_dim, args.d_model).to(device)
    optimizer = torch.optim.AdamW(projector.parameters(), lr=1e-4)
    target = torch.randn(1, 49, args.d_model, device=device)

    def projector_step(tokens: torch.Tensor) -> None:
        loss = nn.functional.mse_loss(projector(tokens), target)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    with tempfile.TemporaryDirectory() as tmp:
        tmp_path = Path(tmp)
        image = write_volume(tmp_path / "scan0.nii.gz")
        manifest = pd.DataFrame({"scan_id": ["scan0"], "image": [str(image)]})
        encode_seconds = timed(
            lambda: encode_manifest(manifest, tmp_path / "cache", encoder, PreprocessConfig(), progress=False), device
        )
        cache = FeatureCache(tmp_path / "cache")
        volume = torch.rand(1, 1, *SHAPE, device=device)
        encoder_step = timed(lambda: projector_step(encoder(volume)), device)
        projector_step(cache.get("scan0").unsqueeze(0).to(device))  # warm-up
        cached_steps = [
            timed(lambda: projector_step(cache.get("scan0").unsqueeze(0).to(device)), device)
            for _ in range(args.cached_steps)
        ]
    cached_step = statistics.median(cached_steps)

    print(f"device: {device} (torch {torch.__version__}, {torch.get_num_threads()} CPU threads)")
    print(f"encoder: {encoder.name}, random init, {sum(p.numel() for p in encoder.parameters()) / 1e6:.1f}M params, "
          f"built in {build_seconds:.1f} s; input 1x1x{SHAPE[0]}x{SHAPE[1]}x{SHAPE[2]}, "
          f"tokens {tuple(cache.token_shape)}")
    print(f"encode once (vlsurv encode path: preprocess + forward + write): {encode_seconds:.2f} s/scan")
    print(f"training step with encoder forward: {encoder_step:.3f} s")
    print(f"training step from cache (median of {args.cached_steps}): {cached_step * 1e3:.2f} ms")
    print(f"ratio encoder step / cached step: {encoder_step / cached_step:.0f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
