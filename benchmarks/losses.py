"""Benchmark: forward + backward time of ``vlsurv.losses.cox_loss`` against torchsurv's
``neg_partial_log_likelihood`` (Breslow and Efron), in the same process.

Inputs: float32 log-risks ~ N(0, 1), integer times in days 1..``--max-day`` (so event times tie, as in real
cohorts), events with probability 0.4. For every (ties, N) the two implementations are timed alternately for
``--repeats`` rounds (each round = ``--inner`` forward+backward calls) and the medians are compared; the
values of the two losses are checked to agree first. Prints one line per case with the ratio ours / torchsurv.

    python benchmarks/losses.py [--sizes 1024 8192] [--repeats 31] [--inner 10] [--device cpu]
"""

from __future__ import annotations

import argparse
import statistics
import time
import warnings

import torch
from torchsurv.loss.cox import neg_partial_log_likelihood

from vlsurv.losses import cox_loss


def ours(log_risk, times, event, ties):
    return cox_loss(log_risk, times, event, ties=ties, reduction="sum")


def torchsurv(log_risk, times, event, ties):
    return neg_partial_log_likelihood(log_risk, event.bool(), times, ties_method=ties, reduction="sum")


def seconds_per_call(function, inputs, ties: str, inner: int, device: torch.device) -> float:
    log_risk = inputs[0]
    start = time.perf_counter()
    for _ in range(inner):
        log_risk.grad = None
        function(*inputs, ties).backward()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / inner


def run_case(n: int, ties: str, args, device: torch.device) -> str:
    generator = torch.Generator().manual_seed(n)
    log_risk = torch.randn(n, generator=generator).to(device).requires_grad_(True)
    times = torch.randint(1, args.max_day + 1, (n,), generator=generator).float().to(device)
    event = (torch.rand(n, generator=generator) < 0.4).long().to(device)
    inputs = (log_risk, times, event)
    ours_value, theirs_value = float(ours(*inputs, ties)), float(torchsurv(*inputs, ties))
    if abs(ours_value - theirs_value) > 1e-4 * abs(theirs_value):
        raise SystemExit(f"{ties} N={n}: losses differ: ours {ours_value} vs torchsurv {theirs_value}")
    for function in (ours, torchsurv):  # warm-up
        seconds_per_call(function, inputs, ties, args.inner, device)
    timings = {ours: [], torchsurv: []}
    for _ in range(args.repeats):
        for function in (ours, torchsurv):
            timings[function].append(seconds_per_call(function, inputs, ties, args.inner, device))
    ours_median, theirs_median = statistics.median(timings[ours]), statistics.median(timings[torchsurv])
    return (
        f"{ties:8s} N={n:6d}  ours {ours_median * 1e3:8.3f} ms  torchsurv {theirs_median * 1e3:8.3f} ms  "
        f"ratio ours/torchsurv {ours_median / theirs_median:5.2f}x"
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--sizes", type=int, nargs="+", default=[1024, 8192])
    parser.add_argument("--repeats", type=int, default=31)
    parser.add_argument("--inner", type=int, default=10)
    parser.add_argument("--max-day", type=int, default=1000)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    warnings.simplefilter("ignore")  # torchsurv warns on every call with tied times
    print(
        f"torch {torch.__version__}, device {device}, threads {torch.get_num_threads()}, "
        f"median of {args.repeats} interleaved rounds x {args.inner} forward+backward calls"
    )
    for ties in ("breslow", "efron"):
        for n in args.sizes:
            print(run_case(n, ties, args, device), flush=True)


if __name__ == "__main__":
    main()
