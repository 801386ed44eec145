"""Prompt building for the vision-language survival model (LLaVA convention).

A sequence is ``[clinical sentence] <image> [question]`` and, when training, ``[answer] EOS``. The text goes
through the tokenizer's chat template when it has one (one user turn, generation prompt added), else through
the plain template ``prompts/model/plain.txt``. The single ``<image>`` special token is expanded to
``num_image_tokens`` placeholder ids; the model scatters the projected image tokens over them.

``encode`` returns 1-D long tensors of one length L:
- ``input_ids``: token ids with ``num_image_tokens`` copies of the ``<image>`` id;
- ``attention_mask``: 1 everywhere (padding is added by ``collate``);
- ``labels``: -100 except the answer tokens and the EOS;
- ``prompt_mask``: 1 on the prompt (clinical sentence, image placeholders, question), 0 on the answer.

Length caps: an answer keeps at most ``max_answer_tokens`` tokens, and prompt + answer + EOS at most
``max_seq_len``; a longer answer is cut (its EOS kept) and counted in ``truncated_answers`` (a count only,
never the text). A prompt that alone leaves no room for the EOS under ``max_seq_len`` is an error.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from vlsurv.errors import InputError
from vlsurv.prompts import read_template

IMAGE_TOKEN = "<image>"
IGNORE_INDEX = -100
PLAIN_TEMPLATE = "model/plain.txt"
PADDING_SIDES = ("right", "left")


class ProcessorError(InputError):
    """A tokenizer or text that cannot make a valid prompt."""


def plain_template() -> str:
    """The plain prompt template with ``{clinical}``, ``<image>`` and ``{question}``."""
    return read_template(PLAIN_TEMPLATE)


class VLMProcessor:
    """Turns (clinical sentence, question, answer) into model inputs; pads batches."""

    def __init__(
        self,
        tokenizer,
        num_image_tokens: int,
        template: str | None = None,
        max_answer_tokens: int | None = None,
        max_seq_len: int | None = None,
    ) -> None:
        for name, value in (
            ("num_image_tokens", num_image_tokens),
            ("max_answer_tokens", max_answer_tokens),
            ("max_seq_len", max_seq_len),
        ):
            if value is not None and value < 1:
                raise ProcessorError(f"{name}: expected >= 1, got {value}")
        if IMAGE_TOKEN not in tokenizer.get_vocab():
            raise ProcessorError(
                f"tokenizer {tokenizer.name_or_path!r} has no {IMAGE_TOKEN} token; "
                f"add it with add_special_tokens (VisionLanguageSurvivalModel does this)"
            )
        if tokenizer.eos_token_id is None:
            raise ProcessorError(f"tokenizer {tokenizer.name_or_path!r} has no eos_token; expected one")
        self.tokenizer = tokenizer
        self.num_image_tokens = num_image_tokens
        self.max_answer_tokens = max_answer_tokens
        self.max_seq_len = max_seq_len
        self.truncated_answers = 0
        self.image_token_id = int(tokenizer.convert_tokens_to_ids(IMAGE_TOKEN))
        self.eos_token_id = int(tokenizer.eos_token_id)
        pad = tokenizer.pad_token_id
        self.pad_token_id = int(pad if pad is not None else tokenizer.eos_token_id)
        self.uses_chat_template = bool(getattr(tokenizer, "chat_template", None))
        self.template = None if self.uses_chat_template else (template or plain_template())
        if self.template is not None and self.template.count(IMAGE_TOKEN) != 1:
            raise ProcessorError(
                f"plain prompt template: expected exactly one {IMAGE_TOKEN}, got {self.template!r}"
            )

    def prompt_text(self, clinical: str, question: str) -> str:
        """The prompt as text, with one ``<image>`` between the clinical sentence and the question."""
        for name, text in (("clinical sentence", clinical), ("question", question)):
            if IMAGE_TOKEN in text:
                raise ProcessorError(f"{name} {text!r} contains {IMAGE_TOKEN}; expected plain text")
        if self.uses_chat_template:
            content = f"{clinical.strip()} {IMAGE_TOKEN} {question.strip()}".strip()
            return self.tokenizer.apply_chat_template(
                [{"role": "user", "content": content}], tokenize=False, add_generation_prompt=True
            )
        bos = self.tokenizer.bos_token or ""
        return bos + self.template.format(clinical=clinical.strip(), question=question.strip())

    def prompt_ids(self, clinical: str, question: str) -> list[int]:
        """Prompt token ids with ``<image>`` expanded to ``num_image_tokens`` placeholders."""
        ids = self.tokenizer(self.prompt_text(clinical, question), add_special_tokens=False)["input_ids"]
        if ids.count(self.image_token_id) != 1:
            raise ProcessorError(
                f"prompt for question {question!r}: expected one {IMAGE_TOKEN} token, got "
                f"{ids.count(self.image_token_id)}"
            )
        at = ids.index(self.image_token_id)
        return ids[:at] + [self.image_token_id] * self.num_image_tokens + ids[at + 1 :]

    def answer_ids(self, answer: str) -> list[int]:
        """Answer token ids followed by EOS."""
        return self.tokenizer(" " + answer.strip(), add_special_tokens=False)["input_ids"] + [
            self.eos_token_id
        ]

    def encode(self, clinical: str, question: str, answer: str | None = None) -> dict[str, torch.Tensor]:
        """One sequence (see the module docstring); ``answer=None`` gives the generation prompt only."""
        prompt = self.prompt_ids(clinical, question)
        answer_part = self.capped_answer(self.answer_ids(answer), len(prompt)) if answer is not None else []
        return self.from_ids(prompt, answer_part)

    def capped_answer(self, answer: list[int], n_prompt: int) -> list[int]:
        """``answer`` (ending in EOS) cut to the length caps, EOS kept; each cut adds 1 to
        ``truncated_answers``."""
        room = len(answer) - 1
        if self.max_answer_tokens is not None:
            room = min(room, self.max_answer_tokens)
        if self.max_seq_len is not None:
            if n_prompt + 1 > self.max_seq_len:
                raise ProcessorError(
                    f"max_seq_len={self.max_seq_len}: the prompt (clinical sentence, image tokens, "
                    "question) has "
                    f"{n_prompt} tokens; expected at most max_seq_len - 1, so that the answer's EOS fits"
                )
            room = min(room, self.max_seq_len - n_prompt - 1)
        if room >= len(answer) - 1:
            return answer
        self.truncated_answers += 1
        return answer[:room] + [self.eos_token_id]

    def from_ids(self, prompt: Sequence[int], answer: Sequence[int] = ()) -> dict[str, torch.Tensor]:
        """Model inputs from already tokenized prompt (with placeholders) and answer (with EOS) ids."""
        ids = list(prompt) + list(answer)
        n_prompt = len(prompt)
        labels = [IGNORE_INDEX] * n_prompt + list(answer)
        return {
            "input_ids": torch.tensor(ids, dtype=torch.long),
            "attention_mask": torch.ones(len(ids), dtype=torch.long),
            "labels": torch.tensor(labels, dtype=torch.long),
            "prompt_mask": torch.tensor([1] * n_prompt + [0] * len(answer), dtype=torch.long),
        }

    def collate(
        self, encoded: Sequence[dict[str, torch.Tensor]], padding_side: str = "right"
    ) -> dict[str, torch.Tensor]:
        """Pad a list of ``encode`` outputs to (B, L_max): right for training, ``"left"`` for generation.

        Pads: ``input_ids`` with the pad id, ``labels`` with -100, the masks with 0. Other keys pass through
        stacked when they are tensors of one shape, else as lists.
        """
        if padding_side not in PADDING_SIDES:
            raise ProcessorError(f"padding_side: expected one of {PADDING_SIDES}, got {padding_side!r}")
        if not encoded:
            raise ProcessorError("collate: expected at least one encoded sequence, got none")
        length = max(int(e["input_ids"].shape[0]) for e in encoded)
        pad_values = {
            "input_ids": self.pad_token_id,
            "labels": IGNORE_INDEX,
            "attention_mask": 0,
            "prompt_mask": 0,
        }
        batch: dict[str, torch.Tensor] = {}
        for key, value in pad_values.items():
            rows = []
            for e in encoded:
                seq = e[key]
                fill = seq.new_full((length - seq.shape[0],), value)
                rows.append(torch.cat([seq, fill] if padding_side == "right" else [fill, seq]))
            batch[key] = torch.stack(rows)
        for key in encoded[0]:
            if key in pad_values:
                continue
            values = [e[key] for e in encoded]
            same_shape = all(torch.is_tensor(v) and v.shape == values[0].shape for v in values)
            batch[key] = torch.stack(values) if same_shape else values
        return batch
