"""A tiny Llama decoder + byte-level BPE tokenizer, saved as a normal Hugging Face directory.

Used by the tests and the demo in place of RadLlama: ``build_tiny_decoder(out_dir, texts)`` trains a
byte-level BPE tokenizer with ``tokenizers`` on ``texts`` (plus the special tokens the processor needs:
``<pad>``, ``<s>``, ``</s>``, ``<image>``), builds a randomly initialised ``LlamaForCausalLM`` from a
``LlamaConfig`` sized to that vocabulary, and saves both with ``save_pretrained`` so that
``AutoModelForCausalLM.from_pretrained(out_dir)`` and ``AutoTokenizer.from_pretrained(out_dir)`` load it.

RadLlama is a Llama that has read radiology text before it meets an image; LoRA then only adapts it.
``pretrain_steps > 0`` gives the tiny decoder the same start: that many causal-LM steps (all weights,
AdamW) on ``texts`` packed into ``pretrain_length``-token windows, seeded, before it is saved.

``cohort_texts(manifest, vqa)`` is that text for a cohort (`vlsurv build-tiny --manifest M --vqa V`): the
train split's question-answer pairs and reports, and every scan's clinical sentence.
"""

from __future__ import annotations

import argparse
from collections.abc import Iterable
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from vlsurv.errors import InputError
from vlsurv.model.processor import IMAGE_TOKEN
from vlsurv.prompts import ANSWER_FORMATS, STATUS_FORMATS, load_questions

PAD_TOKEN = "<pad>"
BOS_TOKEN = "<s>"
EOS_TOKEN = "</s>"
SPECIAL_TOKENS = (PAD_TOKEN, BOS_TOKEN, EOS_TOKEN, IMAGE_TOKEN)


class TinyDecoderError(InputError):
    """Bad arguments for the tiny decoder factory."""


def train_tokenizer(texts: Iterable[str], vocab_size: int = 1024) -> PreTrainedTokenizerFast:
    """Byte-level BPE trained on ``texts``; every byte is in the alphabet, so nothing is unknown."""
    texts = [t for t in texts if t and t.strip()]
    if not texts:
        raise TinyDecoderError("build_tiny_decoder: texts is empty; expected at least one non-blank text")
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=bpe,
        pad_token=PAD_TOKEN,
        bos_token=BOS_TOKEN,
        eos_token=EOS_TOKEN,
        extra_special_tokens=[IMAGE_TOKEN],
    )


def build_tiny_decoder(
    out_dir: str | Path,
    texts: Iterable[str],
    num_layers: int = 2,
    hidden_size: int = 128,
    intermediate_size: int | None = None,
    num_heads: int = 4,
    vocab_size: int = 1024,
    seed: int = 0,
    chat_template: str | None = None,
    pretrain_steps: int = 0,
    pretrain_length: int = 128,
    pretrain_batch_size: int = 16,
    pretrain_lr: float = 3e-3,
) -> Path:
    """Write a tiny ``LlamaForCausalLM`` (safetensors) and its tokenizer to ``out_dir``; return the path.

    ``vocab_size`` is the BPE target; the model's vocabulary is the trained tokenizer's length.
    ``chat_template`` (a Jinja string) is stored on the tokenizer when given; ``pretrain_*``: see above.
    """
    if hidden_size % num_heads:
        raise TinyDecoderError(
            f"build_tiny_decoder: hidden_size {hidden_size} is not divisible by num_heads {num_heads}"
        )
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer = train_tokenizer(texts, vocab_size)
    if chat_template is not None:
        tokenizer.chat_template = chat_template
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=intermediate_size or 3 * hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_heads,
        max_position_embeddings=4096,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    if pretrain_steps > 0:
        pretrain_on_texts(
            model, tokenizer, texts, pretrain_steps, pretrain_length, pretrain_batch_size, pretrain_lr, seed
        )
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return out_dir


def pretrain_on_texts(
    model: LlamaForCausalLM,
    tokenizer: PreTrainedTokenizerFast,
    texts: Iterable[str],
    steps: int,
    length: int = 128,
    batch_size: int = 16,
    lr: float = 3e-3,
    seed: int = 0,
) -> list[float]:
    """Causal-LM training of every weight on ``<s> text </s>`` streams cut into (batch, length) windows.

    Returns the loss of each step; the learning rate decays linearly to 0. Deterministic for a seed on CPU.
    """
    stream: list[int] = []
    for text in texts:
        if text and text.strip():
            stream += [
                tokenizer.bos_token_id,
                *tokenizer(text, add_special_tokens=False).input_ids,
                tokenizer.eos_token_id,
            ]
    if len(stream) <= length:
        raise TinyDecoderError(
            f"pretraining: the texts give {len(stream)} tokens; expected more than {length}"
        )
    windows = torch.tensor(stream[: len(stream) // length * length]).view(-1, length)
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0 - step / steps)
    model.train()
    losses = []
    for _ in range(steps):
        batch = windows[torch.randint(len(windows), (batch_size,), generator=generator)]
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
    model.eval()
    return losses


def _read_texts(paths: list[str]) -> list[str]:
    texts = []
    for name in paths:
        path = Path(name)
        if not path.is_file():
            raise TinyDecoderError(f"--texts {path}: file does not exist")
        texts.extend(line for line in path.read_text(encoding="utf-8").splitlines() if line.strip())
    return texts


def cohort_texts(
    manifest: str | Path,
    vqa: str | Path | None = None,
    template: str = "lung",
    answer_format: str = "as_extracted",
    questions: str = "lung",
) -> list[str]:
    """The text a cohort's tiny decoder learns from, in the demo's order: the train split's question-answer
    pairs of ``vqa`` (when given), every scan's clinical sentence (``template``), the train split's reports.

    ``answer_format`` (``model.answer_format``): the answers as stage 1 will train on them, "status_first" and
    "findings_first" behind their status opening (``vlsurv.training.answer_status.opened_answer``, statuses
    read by the rules reader for ``questions``). A decoder that has read "Present, tumor, left lower lobe: A
    mass in the left lower lobe" hundreds of times repeats the opening's lobe in the sentence; one that met
    the openings only in stage 1 names the lobe of the sentence it has started (demo, seed 0, 60 test scans:
    the sentence repeats the opening's lobe in 46 of 54 tumour answers against 18 of 49).

    Only train-split answers and reports are read, so validation and test text stays unseen.
    """
    from vlsurv.data.clinical import clinical_sentence
    from vlsurv.data.datasets import read_vqa
    from vlsurv.data.manifest import load_manifest

    if answer_format not in ANSWER_FORMATS:
        raise TinyDecoderError(f"answer format {answer_format!r}: expected one of {ANSWER_FORMATS}")
    table = load_manifest(manifest, require_survival=False, check_files=False)
    train = table[table["split"] == "train"]
    if train.empty:
        raise TinyDecoderError(f"--manifest {manifest}: no row has split 'train'; expected training scans")
    train_scans = set(train["scan_id"])
    pairs = [r for r in read_vqa(vqa) if r["scan_id"] in train_scans] if vqa else []
    answers = [r["answer"] for r in pairs]
    if answer_format in STATUS_FORMATS and pairs:
        from vlsurv.metrics_clinical import read_statuses
        from vlsurv.training.answer_status import opened_answer

        ids = [r["question_id"] for r in pairs]
        statuses = read_statuses(ids, answers, load_questions(questions))
        locations = answer_format == "findings_first"
        answers = [opened_answer(*row, locations) for row in zip(ids, answers, statuses)]
    texts = [f"{r['question']} {answer}" for r, answer in zip(pairs, answers)]
    texts += [clinical_sentence(row, template) for row in table.to_dict("records")]
    return texts + train["report"].tolist()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="vlsurv build-tiny", description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="output directory (a Hugging Face model folder)")
    parser.add_argument("--texts", nargs="+", default=[], help="text files; each non-blank line is one text")
    parser.add_argument(
        "--manifest",
        help="cohort manifest: every scan's clinical sentence and the train split's reports",
    )
    parser.add_argument(
        "--vqa",
        help="VQA JSONL (qa_extraction to-vqa): the train split's question-answer pairs (needs --manifest)",
    )
    parser.add_argument(
        "--clinical-template", default="lung", help="clinical template of --manifest's sentences"
    )
    parser.add_argument(
        "--answer-format",
        default="as_extracted",
        choices=ANSWER_FORMATS,
        help="the --vqa answers as stage 1's model.answer_format writes them (default as_extracted)",
    )
    parser.add_argument(
        "--questions", default="lung", help="question set whose rules read the answers' statuses"
    )
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--vocab-size", type=int, default=1024)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--pretrain-steps",
        type=int,
        default=0,
        help="causal-LM steps on the texts before saving (a RadLlama-like start; default 0)",
    )
    args = parser.parse_args(argv)
    if args.vqa is not None and args.manifest is None:
        parser.error("--vqa needs --manifest (its split column says which answers are training text)")
    if not args.texts and args.manifest is None:
        parser.error("expected text to learn from: --texts FILE [FILE ...] and/or --manifest MANIFEST")
    texts = _read_texts(args.texts)
    if args.manifest is not None:
        texts += cohort_texts(
            args.manifest, args.vqa, args.clinical_template, args.answer_format, args.questions
        )
    out = build_tiny_decoder(
        args.out,
        texts,
        num_layers=args.layers,
        hidden_size=args.hidden,
        num_heads=args.heads,
        vocab_size=args.vocab_size,
        seed=args.seed,
        pretrain_steps=args.pretrain_steps,
    )
    print(f"tiny decoder written to {out}")
    return 0
