"""The ``transformers`` backend: a local instruct model (e.g. Mistral-7B-Instruct-v0.2) answers in JSON.

``AutoTokenizer`` / ``AutoModelForCausalLM.from_pretrained(model_dir)`` (``trust_remote_code`` only when
asked). Conversations go through the tokenizer's chat template when it has one (a template that rejects
the system role gets the system text folded into the first user turn), else they are written as plain
"System: / User: / Assistant:" text. Generation is batched (left padding) and greedy.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from qa_extraction.llm import ExtractionPrompts, Item, Messages, Result, answer_items
from vlsurv.errors import ModelLoadError

log = logging.getLogger("qa_extraction")
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _fold_system(messages: Messages) -> Messages:
    """The system text prepended to the first user turn (for templates without a system role)."""
    system = "\n\n".join(m["content"] for m in messages if m["role"] == "system")
    rest = [dict(m) for m in messages if m["role"] != "system"]
    if system and rest and rest[0]["role"] == "user":
        rest[0]["content"] = f"{system}\n\n{rest[0]['content']}"
    return rest


def _plain_prompt(messages: Messages) -> str:
    turns = [f"{m['role'].capitalize()}: {m['content']}" for m in messages]
    return "\n\n".join(turns) + "\n\nAssistant:"


class TransformersBackend:
    name = "transformers"

    def __init__(
        self,
        model_dir: str | Path,
        *,
        batch_size: int = 8,
        max_new_tokens: int = 160,
        trust_remote_code: bool = False,
        dtype: str = "auto",
        device: str | None = None,
    ):
        path = Path(model_dir)
        if not (path / "config.json").is_file():
            raise ModelLoadError(
                f"--model {path}: not a model folder (no config.json); expected a local folder "
                "saved with save_pretrained"
            )
        self.model = path.name
        self.batch_size, self.max_new_tokens = batch_size, max_new_tokens
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
            self.lm = AutoModelForCausalLM.from_pretrained(
                path, trust_remote_code=trust_remote_code, dtype=_DTYPES.get(dtype, "auto")
            )
        except (OSError, ValueError) as err:
            raise ModelLoadError(f"--model {path}: transformers cannot load it ({err})") from err
        self.lm.to(self.device).eval()
        self.tokenizer.padding_side = "left"
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.prompts = ExtractionPrompts.load()

    def prompt_text(self, messages: Messages) -> str:
        if not getattr(self.tokenizer, "chat_template", None):
            return _plain_prompt(messages)
        try:
            return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        except Exception:  # noqa: BLE001 - jinja raises its own TemplateError for an unsupported system role
            return self.tokenizer.apply_chat_template(
                _fold_system(messages), tokenize=False, add_generation_prompt=True
            )

    @torch.no_grad()
    def generate(self, conversations: list[Messages]) -> list[str]:
        """Greedy replies, ``batch_size`` conversations at a time."""
        replies: list[str] = []
        for start in range(0, len(conversations), self.batch_size):
            texts = [self.prompt_text(m) for m in conversations[start : start + self.batch_size]]
            templated = bool(getattr(self.tokenizer, "chat_template", None))  # the template adds BOS itself
            batch = self.tokenizer(
                texts, return_tensors="pt", padding=True, add_special_tokens=not templated
            ).to(self.device)
            output = self.lm.generate(
                **batch,
                do_sample=False,
                max_new_tokens=self.max_new_tokens,
                pad_token_id=self.tokenizer.pad_token_id,
            )
            new_tokens = output[:, batch["input_ids"].shape[1] :]
            replies += self.tokenizer.batch_decode(new_tokens, skip_special_tokens=True)
        return replies

    def run(self, items: Sequence[Item]) -> Iterator[tuple[Item, Result]]:
        log.info(
            "transformers backend: %d items, batch size %d, device %s",
            len(items),
            self.batch_size,
            self.device,
        )
        return answer_items(self.generate, items, self.batch_size, self.prompts)
