"""Benchmark: risk scoring of the six questions for 32 scans, naive vs shared-prefix batched.

Decoder: a random-init Llama, 8 layers x 512 hidden (built in a temporary folder with the tiny factory),
LoRA on q/k/v/o, 49 image tokens of width 2048 (Merlin's shape), DeepSurv head.
- naive: per scan, six separate prompts, each answered with ``generate`` (greedy, --max-new-tokens) and then
  one full forward pass of prompt + answer (``pool="all"``), the paper's inference as written;
- shared-prefix: the clinical sentence + image tokens run once per scan, the KV cache is repeated over the six
  questions, --batch-scans scans per batch, ``pool="prompt"`` (no generation).
A third line times the shared-prefix path with generation and ``pool="all"`` (the same work as naive) and
reports its largest risk difference to naive, to separate the prefix/batching gain from the skipped decoding.

    python benchmarks/ensemble.py [--scans 32] [--max-new-tokens 16] [--batch-scans 8] [--device cpu|cuda]
"""

from __future__ import annotations

import argparse
import tempfile
import time

import torch

from vlsurv.model import LoRAConfig, ModelConfig, VisionLanguageSurvivalModel
from vlsurv.model.ensemble import DecodeOptions, ScanInput, score_naive, score_shared_prefix
from vlsurv.model.tiny import build_tiny_decoder
from vlsurv.prompts import load_questions

CLINICAL = [
    "{age} year-old {sex} former smoker lung cancer patient, stage {stage}, T stage is T{t}, N stage is N1, "
    "M stage is M0.",
    "{age} year-old {sex} never smoker lung cancer patient, stage {stage}, T stage is T{t}.",
]


def build_model(workdir: str, questions: list[str], device: torch.device) -> VisionLanguageSurvivalModel:
    texts = [
        c.format(age=a, sex=s, stage=st, t=t)
        for c in CLINICAL
        for a in (55, 71)
        for s in ("male", "female")
        for st in (1, 3)
        for t in (1, 4)
    ] + questions
    decoder = build_tiny_decoder(
        f"{workdir}/decoder", texts * 4, num_layers=8, hidden_size=512, num_heads=8, intermediate_size=1376
    )
    config = ModelConfig(
        decoder_path=str(decoder),
        image_token_dim=2048,
        num_image_tokens=49,
        lora=LoRAConfig(r=8, alpha=16, dropout=0.0),
    )
    return VisionLanguageSurvivalModel(config).to(device).eval()


def make_scans(n: int) -> list[ScanInput]:
    generator = torch.Generator().manual_seed(0)
    return [
        ScanInput(
            f"scan{i}",
            CLINICAL[i % 2].format(
                age=50 + i, sex="male" if i % 3 else "female", stage=1 + i % 4, t=1 + i % 4
            ),
            torch.randn(49, 2048, generator=generator),
        )
        for i in range(n)
    ]


def timed(fn):
    start = time.perf_counter()
    result = fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter() - start, result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scans", type=int, default=32)
    parser.add_argument("--max-new-tokens", type=int, default=16)
    parser.add_argument("--batch-scans", type=int, default=8)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    device = torch.device(args.device)
    questions = [q.text for q in load_questions("lung")]
    with tempfile.TemporaryDirectory() as workdir:
        torch.manual_seed(0)
        model = build_model(workdir, questions, device)
        scans = make_scans(args.scans)
        generate = DecodeOptions(generate=True, max_new_tokens=args.max_new_tokens)
        risk_only = DecodeOptions(generate=False)

        def shared(pool, options):
            return [
                score_shared_prefix(model, scans[i : i + args.batch_scans], questions, pool, options)
                for i in range(0, len(scans), args.batch_scans)
            ]

        score_naive(model, scans[:1], questions[:1], "all", generate)  # warm-up
        score_shared_prefix(model, scans[:2], questions, "prompt", risk_only)
        naive_s, naive = timed(lambda: score_naive(model, scans, questions, "all", generate))
        fast_s, _ = timed(lambda: shared("prompt", risk_only))
        same_work_s, same_work = timed(lambda: shared("all", generate))
    same_risks = torch.cat([r.risks for r in same_work])
    max_diff = (same_risks - naive.risks).abs().max().item()
    print(
        f"device {device}, torch threads {torch.get_num_threads()}, decoder 8 layers x 512, "
        f"{args.scans} scans x "
        f"{len(questions)} questions, max_new_tokens {args.max_new_tokens}, batch_scans {args.batch_scans}"
    )
    print(f"naive (6 separate prompts per scan, generate + full forward, pool=all): {naive_s:8.2f} s")
    print(f"shared prefix, batched, pool=prompt, no generation:                    {fast_s:8.2f} s")
    print(
        f"shared prefix, batched, pool=all, with generation (same work as naive): {same_work_s:8.2f} s "
        f"(max |risk - naive risk| = {max_diff:.2e})"
    )
    print(f"ratio naive / shared-prefix pool=prompt: {naive_s / fast_s:.1f}x (goal >= 3x)")
    print(f"ratio naive / shared-prefix pool=all with generation: {naive_s / same_work_s:.1f}x")


if __name__ == "__main__":
    main()
