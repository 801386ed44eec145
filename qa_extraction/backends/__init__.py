"""Extraction backends: ``rules`` (offline), ``transformers`` (local model folder), ``openai`` (HTTP).

Every backend has ``name``, ``model`` and ``run(items) -> iterator of (Item, Result)``, one result per
item; the LLM backends also have ``generate(conversations) -> replies``, which the vocabulary step uses
to draft question templates. ``add_backend_arguments`` / ``build_backend`` are the shared CLI flags.
"""

from __future__ import annotations

import argparse
import os

from qa_extraction.backends.rules import RulesBackend
from vlsurv.errors import InputError

BACKENDS = ("rules", "transformers", "openai")
DEFAULT_BASE_URL = "http://localhost:8000/v1"


class BackendConfigError(InputError):
    """Backend flags that do not fit together (a missing --model, a batch size below 1...)."""


def add_backend_arguments(parser: argparse.ArgumentParser, default: str | None = "rules") -> None:
    group = parser.add_argument_group("backend")
    group.add_argument("--backend", choices=BACKENDS if default else BACKENDS[1:], default=default)
    group.add_argument("--model", help="transformers: a local model folder; openai: the served model name")
    group.add_argument(
        "--batch-size",
        type=int,
        default=8,
        help="conversations generated together (openai: at least --concurrency); rows are "
        "written after each batch",
    )
    group.add_argument("--max-new-tokens", type=int, default=160)
    group.add_argument("--trust-remote-code", action="store_true", help="transformers: run the folder's code")
    group.add_argument("--dtype", default="auto", choices=("auto", "float32", "bfloat16", "float16"))
    group.add_argument(
        "--device", default=None, help="transformers: cpu, cuda, cuda:1 (default: cuda if any)"
    )
    group.add_argument(
        "--base-url",
        default=None,
        help=f"openai: server URL (env VLSURV_OPENAI_BASE_URL, default {DEFAULT_BASE_URL})",
    )
    group.add_argument(
        "--api-key", default=None, help="openai: API key (prefer the env variable OPENAI_API_KEY)"
    )
    group.add_argument("--concurrency", type=int, default=8, help="openai: requests in flight")
    group.add_argument("--timeout", type=float, default=120.0, help="openai: seconds per request")
    group.add_argument("--max-retries", type=int, default=3, help="openai: retries after a 5xx or a timeout")
    group.add_argument(
        "--backoff", type=float, default=1.0, help="openai: first retry delay in seconds (doubles)"
    )


def build_backend(args: argparse.Namespace, questions=None):
    """The backend the parsed flags ask for (``questions`` are needed by the rules backend)."""
    if args.backend == "rules":
        return RulesBackend(questions)
    if args.batch_size < 1:
        raise BackendConfigError(f"--batch-size must be >= 1, got {args.batch_size}")
    if args.backend == "transformers":
        from qa_extraction.backends.transformers_lm import TransformersBackend  # torch + transformers, ~3 s

        if not args.model:
            raise BackendConfigError("--backend transformers needs --model, a local model folder")
        return TransformersBackend(
            args.model,
            batch_size=args.batch_size,
            max_new_tokens=args.max_new_tokens,
            trust_remote_code=args.trust_remote_code,
            dtype=args.dtype,
            device=args.device,
        )
    from qa_extraction.backends.openai_api import OpenAIBackend  # it imports BackendConfigError from here

    if not args.model:
        raise BackendConfigError("--backend openai needs --model, the model name the server serves")
    return OpenAIBackend(
        base_url=args.base_url or os.environ.get("VLSURV_OPENAI_BASE_URL") or DEFAULT_BASE_URL,
        api_key=args.api_key or os.environ.get("OPENAI_API_KEY") or "",
        model=args.model,
        batch_size=max(args.batch_size, args.concurrency),
        max_tokens=args.max_new_tokens,
        concurrency=args.concurrency,
        timeout=args.timeout,
        max_retries=args.max_retries,
        backoff=args.backoff,
    )
