"""Benchmark: `vlsurv encode` throughput on CT-RATE-sized volumes, 0 against N DataLoader workers.

Writes one synthetic CT of CT-RATE's size (512 x 512 x 300 int16 at 0.7 x 0.7 x 1 mm: a body ellipse at
40 HU in air with 20 HU noise, gzip NIfTI) and copies it ``--scans`` times. Each copy goes through
``encode_manifest`` with Merlin's preprocessing (RAS, 1.5 x 1.5 x 3 mm, 224 x 224 x 160) and the tiny or the
full-size Merlin-architecture encoder (random init), once with 0 workers and once with ``--workers``.
Prints scans/s and their ratio, the share of time spent in load, resample and encode, each loading process's
peak memory, and the projected hours for CT-RATE's 50,188 volumes per node of N cores and one GPU, with the
assumptions used. The full encoder's GPU rate is not measured here: it comes from its FLOPs and
``--gpu-tflops``.

    python benchmarks/encode_throughput.py [--scans 6] [--full-scans 2] [--workers 2] [--encoders tiny,full]
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import torch
from torch.utils.flop_counter import FlopCounterMode

from vlsurv.data.transforms import PreprocessConfig
from vlsurv.encoders.cache import encode_manifest
from vlsurv.encoders.merlin import EncoderConfig, MerlinImageEncoder, tiny_config
from vlsurv.encoders.scans import MAIN_PROCESS, EncodeStats

CT_RATE_VOLUMES = 50_188
SHAPE, SPACING = (512, 512, 300), (0.7, 0.7, 1.0)


def write_volumes(folder: Path, n: int) -> pd.DataFrame:
    """One CT-RATE-sized int16 volume (gzip NIfTI), copied ``n`` times; the manifest frame."""
    folder.mkdir(parents=True, exist_ok=True)
    x, y = np.ogrid[: SHAPE[0], : SHAPE[1]]
    body = ((x - 256) / 200.0) ** 2 + ((y - 256) / 150.0) ** 2 < 1
    noise = np.random.default_rng(0).normal(0.0, 20.0, size=SHAPE).astype(np.int16)
    volume = np.where(body[..., None], np.int16(40), np.int16(-1000)) + noise
    first = folder / "scan0.nii.gz"
    nib.save(nib.Nifti1Image(volume, np.diag([*SPACING, 1.0])), str(first))
    images = [first] + [folder / f"scan{i}.nii.gz" for i in range(1, n)]
    for image in images[1:]:
        shutil.copyfile(first, image)
    return pd.DataFrame(
        {"scan_id": [image.name.split(".")[0] for image in images], "image": list(map(str, images))}
    )


def encoder_tflops(config: EncoderConfig, shape: tuple[int, int, int]) -> float:
    """TFLOPs of one forward (B = 1) at ``shape``, counted on the meta device."""
    with torch.device("meta"):
        encoder = MerlinImageEncoder(config)
        volume = torch.empty(1, 1, *shape)
    with FlopCounterMode(display=False) as counter:
        encoder(volume)
    return counter.get_total_flops() / 1e12


def run(frame: pd.DataFrame, out: Path, encoder: MerlinImageEncoder, workers: int) -> EncodeStats:
    stats = EncodeStats()
    encode_manifest(frame, out, encoder, PreprocessConfig(), num_workers=workers, progress=False, stats=stats)
    shutil.rmtree(out)
    return stats


def memory_text(stats: EncodeStats) -> str:
    return ", ".join(
        f"{'main process' if worker == MAIN_PROCESS else f'worker {worker}'} peak {peak:.0f} MiB "
        f"(+{stats.added_rss_mb[worker]:.0f} MiB over its start)"
        for worker, peak in sorted(stats.peak_rss_mb.items())
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scans", type=int, default=6, help="scans per run with the tiny encoder")
    parser.add_argument("--full-scans", type=int, default=2, help="scans per run with the full encoder")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--encoders", default="tiny,full", help="comma-separated: tiny, full")
    parser.add_argument("--cores", default="8,16,32,64", help="node sizes (CPU cores) for the projection")
    parser.add_argument(
        "--gpu-tflops",
        type=float,
        default=100.0,
        help="assumed sustained bf16 TFLOP/s of one GPU on 3D convs",
    )
    args = parser.parse_args(argv)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads in the main process, CPU only")
    prepare = None
    with tempfile.TemporaryDirectory() as tmp:
        frame = write_volumes(Path(tmp) / "volumes", max(args.scans, args.full_scans))
        print(
            f"volume: {SHAPE} int16 at {SPACING} mm, {Path(frame['image'][0]).stat().st_size / 1e6:.0f} MB gz"
        )
        for name in args.encoders.split(","):
            config = EncoderConfig() if name == "full" else tiny_config()
            encoder, n = MerlinImageEncoder(config), args.full_scans if name == "full" else args.scans
            rates = {}
            for workers in (0, args.workers):
                stats = run(frame.head(n), Path(tmp) / "cache", encoder, workers)
                rates[workers] = stats.scans / stats.wall_s
                stages = {"load": stats.load_s, "resample": stats.resample_s, "encode": stats.encode_s}
                shares = ", ".join(f"{k} {100 * v / sum(stages.values()):.0f}%" for k, v in stages.items())
                per_scan = (
                    f"load {stats.load_s / n:.2f} s, resample {stats.resample_s / n:.2f} s, "
                    f"encode {stats.encode_s / n:.2f} s"
                )
                print(
                    f"{name} encoder ({config.name}), {workers} workers, {n} scans: {rates[workers]:.3f} "
                    f"scans/s; per scan {per_scan} (shares of their sum: {shares}); {memory_text(stats)}"
                )
                if workers == 0:
                    prepare = (stats.load_s + stats.resample_s) / n
            print(
                f"{name} encoder: {args.workers} workers / 0 workers = {rates[args.workers] / rates[0]:.2f}x"
            )
    tflops = encoder_tflops(EncoderConfig(), PreprocessConfig().spatial_size)
    gpu_rate = args.gpu_tflops / tflops
    print(
        f"\nprojection for {CT_RATE_VOLUMES} CT-RATE volumes, assuming: load + resample take {prepare:.2f} s "
        f"per scan in one process (measured above with 0 workers on a contended 2-core machine: an upper "
        f"bound), one worker per core but one core for the main process, workers scale linearly (no I/O "
        f"limit, memory for N workers at the peak above); the full Merlin encoder "
        f"costs {tflops:.2f} TFLOP per scan and one GPU sustains {args.gpu_tflops:.0f} TFLOP/s in bf16 "
        f"({gpu_rate:.1f} scans/s, not measured here); the slower of the two sets the pace"
    )
    for cores in (int(c) for c in args.cores.split(",")):
        cpu_rate = (cores - 1) / prepare
        rate = min(cpu_rate, gpu_rate)
        bound = "CPU" if cpu_rate < gpu_rate else "GPU"
        rates_text = f"preprocessing {cpu_rate:.1f} scans/s, encoder {gpu_rate:.1f} scans/s"
        hours = CT_RATE_VOLUMES / rate / 3600
        print(f"  {cores:3d} cores + 1 GPU: {rates_text} -> {hours:.1f} h ({bound}-bound)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
