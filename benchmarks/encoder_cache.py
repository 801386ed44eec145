"""Benchmark: a training step that reads cached tokens vs one that runs the full Merlin encoder.

Both steps share the same tail: tokens (1, 49, 2048) -> linear projector (2048 -> d_model) ->
MSE loss -> backward -> AdamW step. The encoder step first runs the full-size
MerlinImageEncoder (I3D ResNet-152, random init) on a (1, 1, 224, 224, 160) volume (its forward
is timed on its own: the encoder's seconds per scan). The cached step reads (49, 2048) tokens
from a FeatureCache that `encode_manifest` wrote for a 224 x 224 x 160 NIfTI; to keep the run
short those tokens come from a one-block-per-stage encoder of the same width (reading a cache
costs the same whatever encoder filled it). Prints the ratio of the two step times.

    python benchmarks/encoder_cache.py [--device cpu|cuda] [--cached-steps 20] [--encoder-steps N]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import TypeVar

import nibabel as nib
import numpy as np
import pandas as pd
import torch
from torch import nn

from vlsurv.data.transforms import PreprocessConfig
from vlsurv.encoders.cache import FeatureCache, encode_manifest
from vlsurv.encoders.merlin import EncoderConfig, MerlinImageEncoder

T = TypeVar("T")
SHAPE = (224, 224, 160)
SPACING = (1.5, 1.5, 3.0)


def write_volume(path: Path, seed: int = 0) -> Path:
    """A HU volume already at Merlin's size and spacing (RAS affine), so preprocessing is light."""
    rng = np.random.default_rng(seed)
    volume = rng.normal(-300.0, 400.0, size=SHAPE).astype(np.float32)
    nib.save(nib.Nifti1Image(volume, np.diag([*SPACING, 1.0])), str(path))
    return path


def timed(fn: Callable[[], T], device: torch.device) -> tuple[float, T]:
    """(wall seconds, result) of ``fn()``, synchronising the GPU around it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    result = fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start, result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--d-model", type=int, default=4096, help="decoder width the projector maps to")
    parser.add_argument("--cached-steps", type=int, default=20)
    parser.add_argument(
        "--encoder-steps", type=int, default=0, help="timed encoder steps (0: 5 on GPU, 1 on CPU)"
    )
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
        filler = MerlinImageEncoder(EncoderConfig(layers=(1, 1, 1, 1))).to(device)
        encode_manifest(manifest, tmp_path / "cache", filler, PreprocessConfig(), progress=False)
        cache = FeatureCache(tmp_path / "cache")
        volume = torch.rand(1, 1, *SHAPE, device=device)
        projector_step(cache.get("scan0").unsqueeze(0).to(device))  # warm-up of the shared tail
        if device.type == "cuda":
            encoder(volume)  # warm-up: kernel selection and allocator, not counted
        forward_times, encoder_steps = [], []
        for _ in range(args.encoder_steps or (5 if device.type == "cuda" else 1)):
            forward_seconds, tokens = timed(lambda: encoder(volume), device)
            tail_seconds, _ = timed(partial(projector_step, tokens), device)
            forward_times.append(forward_seconds)
            encoder_steps.append(forward_seconds + tail_seconds)
        cached_steps = [
            timed(lambda: projector_step(cache.get("scan0").unsqueeze(0).to(device)), device)[0]
            for _ in range(args.cached_steps)
        ]
        token_shape = cache.token_shape
    cached_step, encoder_step = statistics.median(cached_steps), statistics.median(encoder_steps)
    forward_seconds = statistics.median(forward_times)

    print(f"device: {device} (torch {torch.__version__}, {torch.get_num_threads()} CPU threads)")
    print(
        f"encoder: {encoder.name}, random init, "
        f"{sum(p.numel() for p in encoder.parameters()) / 1e6:.1f}M params, "
        f"built in {build_seconds:.1f} s; input 1x1x{SHAPE[0]}x{SHAPE[1]}x{SHAPE[2]}, "
        f"tokens {token_shape}"
    )
    print(f"encoder forward (median of {len(forward_times)}): {forward_seconds:.3f} s/scan")
    print(f"training step with encoder forward (median of {len(encoder_steps)}): {encoder_step:.3f} s")
    print(f"training step from cache (median of {args.cached_steps}): {cached_step * 1e3:.2f} ms")
    print(f"ratio encoder step / cached step: {encoder_step / cached_step:.0f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
