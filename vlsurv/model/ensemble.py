"""The prompt ensemble: several questions per scan, each giving a risk (and an answer), batched over scans.

Every prompt of a scan starts with the same prefix, ``[clinical sentence] <image>`` (the question comes after
the image placeholders), so ``score_shared_prefix`` runs that prefix once per scan, repeats the decoder's KV
cache over the Q questions, runs only the question suffixes on top, and, when asked, decodes answers token by
token on the same cache. ``score_naive`` is the reference: one full forward pass (and one ``generate``) per
(scan, question). Both pool the last hidden states exactly as training does: ``pool="prompt"`` over the prompt
tokens, ``pool="all"`` over prompt + generated answer (EOS included), so their risks agree to float tolerance.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from vlsurv.config import ConfigError, bounded, check_fields
from vlsurv.model.model_config import POOLS
from vlsurv.model.vlm import VisionLanguageSurvivalModel, masked_sum, positions_from_mask

if TYPE_CHECKING:
    from transformers import DynamicCache

    from vlsurv.model.lobe_guidance import LobeGuide


class EnsembleError(ConfigError):
    """Inputs or decoding options that the prompt ensemble cannot score (a ConfigError, so that
    ``check_fields`` can raise it naming the field)."""


@dataclass
class ScanInput:
    """One scan: its id, clinical sentence, image tokens (T, C) and, for a model whose survival head reads
    them, its (p,) clinical covariates (``VisionLanguageSurvivalModel.clinical_covariates``)."""

    scan_id: str
    clinical: str
    image_tokens: torch.Tensor
    covariates: torch.Tensor | None = None


@dataclass
class DecodeOptions:
    """Answer generation: greedy by default; temperature sampling with ``do_sample``; stops at EOS."""

    generate: bool = True
    """Generate an answer per question (and pool its hidden states); off scores the prompt alone."""
    max_new_tokens: int = bounded(64, ge=1)
    """Most answer tokens generated per question."""
    do_sample: bool = False
    """Sample answer tokens at ``temperature`` instead of taking the most likely one."""
    temperature: float = bounded(1.0, gt=0.0)
    """Sampling temperature (with ``do_sample``)."""

    def __post_init__(self) -> None:
        check_fields(self, "", EnsembleError)


@dataclass
class EnsembleOutput:
    """risks (S, Q) float32; answers S lists of Q strings ("" without generation); curves (S, Q, K) or
    None; status_margin (S, Q) float32 or None: for a ``status_first`` model with generation, the first answer
    token's logit of "Present" minus that of "Absent", the status bias included (> 0: the answer opens
    "Present:"); pooled (S, Q, d) or None: the pooled hidden states the survival branch read
    (``survival_outputs`` gives the risks again from them)."""

    risks: torch.Tensor
    answers: list[list[str]]
    survival_curves: torch.Tensor | None
    status_margin: torch.Tensor | None = None
    pooled: torch.Tensor | None = None


def split_prompts(model: VisionLanguageSurvivalModel, clinical: str, questions: Sequence[str]):
    """(shared prefix ids up to the last image placeholder, [suffix ids per question])."""
    processor = model.processor
    prompts = [processor.prompt_ids(clinical, q) for q in questions]
    end = prompts[0].index(processor.image_token_id) + processor.num_image_tokens
    prefix = prompts[0][:end]
    for question, ids in zip(questions, prompts):
        if ids[:end] != prefix:
            raise EnsembleError(
                f"question {question!r}: its prompt differs from the others before the image; the template "
                "must put the question after <image> for the shared prefix"
            )
    return prefix, [ids[end:] for ids in prompts]


def _next_token(
    logits, options: DecodeOptions, generator: torch.Generator | None, image_token_id: int
) -> torch.Tensor:
    """(N, V) logits -> (N,) next tokens; the ``<image>`` placeholder is never generated."""
    logits = logits.float().index_fill(
        -1, torch.tensor([image_token_id], device=logits.device), float("-inf")
    )
    if not options.do_sample:
        return logits.argmax(-1)
    probs = torch.softmax(logits / options.temperature, dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def _decode_answers(model: VisionLanguageSurvivalModel, rows: list[list[int]]) -> list[str]:
    """Answer texts: each row cut at its first EOS, special tokens dropped."""
    eos = model.processor.eos_token_id
    answers = []
    for row in rows:
        row = row[: row.index(eos)] if eos in row else row
        answers.append(model.tokenizer.decode(row, skip_special_tokens=True).strip())
    return answers


def _cache_argument(lm) -> str:
    """The name under which ``lm``'s forward takes the KV cache: ``cache`` since transformers 5 renamed it
    (the old name warns), ``past_key_values`` in earlier versions and in remote-code decoders."""
    base = lm.get_base_model() if hasattr(lm, "get_base_model") else lm
    return "cache" if "cache" in inspect.signature(base.forward).parameters else "past_key_values"


def _generate_on_cache(
    model: VisionLanguageSurvivalModel,
    cache: DynamicCache,
    mask: torch.Tensor,
    next_pos: torch.Tensor,
    logits: torch.Tensor,
    options: DecodeOptions,
    generator: torch.Generator | None,
    decision: tuple[int, int, int] | None = None,
    bias: torch.Tensor | None = None,
    guide: LobeGuide | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Decode up to max_new_tokens per row on ``cache``; -> (tokens (N, n), hidden sum (N, d), count (N,),
    status margin (N,) or None).

    ``decision`` (step k, "Present" id, "Absent" id; ``VisionLanguageSurvivalModel.status_decision``): at
    answer token k, ``bias`` (N,) is added to the "Present" logit, and the margin is its logit minus the
    "Absent" one (None when decoding stops before step k). ``guide`` (``model.lobe_guide``): after step k, it
    chooses the side and level words of the rows it guides (``vlsurv.model.lobe_guidance.LobeGuide``)."""
    lm, pad, eos = model.language_model, model.processor.pad_token_id, model.processor.eos_token_id
    n = logits.shape[0]
    finished = torch.zeros(n, dtype=torch.bool, device=logits.device)
    hidden_sum = torch.zeros(n, model.hidden_size, device=logits.device)
    count = torch.zeros(n, device=logits.device)
    tokens, cache_kwarg, margin = [], {_cache_argument(lm): cache}, None
    for step in range(options.max_new_tokens):
        if decision is not None and step == decision[0]:
            present, absent = decision[1:]
            logits = logits.float().index_add(
                -1, torch.tensor([present], device=logits.device), bias[:, None]
            )
            margin = logits[:, present] - logits[:, absent]
        active = ~finished
        token = torch.where(
            active,
            _next_token(logits, options, generator, model.processor.image_token_id),
            torch.full_like(finished, pad, dtype=torch.long),
        )
        if guide is not None and decision is not None and step > decision[0]:
            token = torch.where(active, guide.step(token, logits), token)
        tokens.append(token)
        mask = torch.cat([mask, active.long()[:, None]], dim=1)
        out = lm(
            input_ids=token[:, None],
            attention_mask=mask,
            position_ids=next_pos[:, None],
            **cache_kwarg,
            use_cache=True,
            output_hidden_states=True,
        )
        hidden_sum += masked_sum(out.hidden_states[-1][:, -1:], active[:, None])
        count += active
        next_pos = next_pos + active.long()
        finished |= token == eos
        if bool(finished.all()):
            break
        logits = out.logits[:, -1]
    return torch.stack(tokens, dim=1), hidden_sum, count, margin


def scan_covariates(scans: Sequence[ScanInput]) -> torch.Tensor | None:
    """The scans' covariates stacked (S, p), or None when the scans carry none."""
    given = [scan.covariates is not None for scan in scans]
    if not any(given):
        return None
    if not all(given):
        raise EnsembleError(
            f"scan_id {scans[given.index(False)].scan_id!r} has no clinical covariates and others do; "
            "expected them for every scan or none"
        )
    return torch.stack([scan.covariates for scan in scans])


def survival_outputs(
    model: VisionLanguageSurvivalModel,
    z: torch.Tensor,
    shape: tuple[int, int],
    covariates: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Pooled hidden states z (S x Q, d), scan-major, and the scans' (S, p) clinical covariates (when the
    model reads them) -> risks (S, Q) float32 and DeepHit curves (S, Q, K) or None."""
    if covariates is not None:
        covariates = covariates.repeat_interleave(shape[1], dim=0)
    survival = model.survive(z, covariates)
    risks = model.risk(survival).float().reshape(shape)
    curves = None
    if model.config.survival.head == "deephit":
        curves = model.survival_curve(survival).reshape(*shape, -1)
    return risks, curves


def _check(
    model: VisionLanguageSurvivalModel, scans: Sequence[ScanInput], questions: Sequence[str], pool: str
) -> None:
    if pool not in POOLS:
        raise EnsembleError(f"pool: expected one of {POOLS}, got {pool!r}")
    if not scans or not questions:
        raise EnsembleError(
            f"expected at least one scan and one question, got {len(scans)} and {len(questions)}"
        )
    expected = (model.config.num_image_tokens, model.config.image_token_dim)
    for scan in scans:
        if tuple(scan.image_tokens.shape) != expected:
            raise EnsembleError(
                f"scan_id {scan.scan_id!r}: image tokens of shape {tuple(scan.image_tokens.shape)}; "
                "the model "
                f"expects (num_image_tokens, image_token_dim) = {expected}"
            )


@torch.no_grad()
def score_shared_prefix(
    model: VisionLanguageSurvivalModel,
    scans: Sequence[ScanInput],
    questions: Sequence[str],
    pool: str = "prompt",
    options: DecodeOptions | None = None,
    generator: torch.Generator | None = None,
    status_bias: Sequence[float] | None = None,
    question_ids: Sequence[str] | None = None,
) -> EnsembleOutput:
    """Risks of S scans x Q questions with one prefix pass per scan and a KV cache repeated Q times.

    ``status_bias`` (Q,): for a ``status_first`` model, added to the logit of the "Present" opening at the
    first answer token (``VisionLanguageSurvivalModel.status_bias_for``); default none. ``question_ids`` (Q,):
    the questions' ids, which a model with ``answer_guidance`` needs (``model.lobe_guide``)."""
    # transformers loads with a model, not when `vlsurv predict --help` imports this module
    from transformers import DynamicCache

    options = options or DecodeOptions()
    _check(model, scans, questions, pool)
    processor, lm = model.processor, model.language_model
    device = lm.get_input_embeddings().weight.device
    n_scans, n_questions = len(scans), len(questions)
    splits = [split_prompts(model, scan.clinical, questions) for scan in scans]

    prefix = processor.collate([processor.from_ids(p) for p, _ in splits], padding_side="left")
    ids, mask = prefix["input_ids"].to(device), prefix["attention_mask"].to(device)
    images = torch.stack([scan.image_tokens for scan in scans])
    cache = DynamicCache()
    cache_kwarg = {_cache_argument(lm): cache}
    out = lm(
        inputs_embeds=model.embed_inputs(ids, model.get_image_features(images)),
        attention_mask=mask,
        position_ids=positions_from_mask(mask),
        **cache_kwarg,
        use_cache=True,
        output_hidden_states=True,
        logits_to_keep=1,
    )
    hidden_sum = masked_sum(out.hidden_states[-1], mask).repeat_interleave(n_questions, 0)
    count = mask.sum(-1).float().repeat_interleave(n_questions, 0)
    cache.batch_repeat_interleave(n_questions)
    mask = mask.repeat_interleave(n_questions, 0)

    suffix = processor.collate(
        [processor.from_ids(s) for _, per_scan in splits for s in per_scan], padding_side="right"
    )
    suffix_ids, suffix_mask = suffix["input_ids"].to(device), suffix["attention_mask"].to(device)
    start = count.long()
    positions = start[:, None] + torch.arange(suffix_ids.shape[1], device=device)
    mask = torch.cat([mask, suffix_mask], dim=1)
    out = lm(
        input_ids=suffix_ids,
        attention_mask=mask,
        position_ids=positions,
        **cache_kwarg,
        use_cache=options.generate,
        output_hidden_states=True,
        logits_to_keep=0 if options.generate else 1,
    )
    hidden_sum += masked_sum(out.hidden_states[-1], suffix_mask)
    count += suffix_mask.sum(-1)

    answers = [[""] * n_questions for _ in scans]
    margin = None
    if options.generate:
        rows = torch.arange(suffix_ids.shape[0], device=device)
        logits = out.logits[rows, suffix_mask.sum(-1) - 1]
        decision = model.status_decision()
        bias = torch.tensor(list(status_bias or [0.0] * n_questions), device=device).repeat(n_scans)
        guide = model.lobe_guide(images, question_ids)
        tokens, answer_sum, answer_count, margin = _generate_on_cache(
            model, cache, mask, count.long(), logits, options, generator, decision, bias, guide
        )
        margin = None if margin is None else margin.reshape(n_scans, n_questions)
        flat = _decode_answers(model, tokens.tolist())
        answers = [flat[i * n_questions : (i + 1) * n_questions] for i in range(n_scans)]
        if pool == "all":
            hidden_sum, count = hidden_sum + answer_sum, count + answer_count
    pooled = hidden_sum / count[:, None]
    risks, curves = survival_outputs(model, pooled, (n_scans, n_questions), scan_covariates(scans))
    return EnsembleOutput(
        risks=risks,
        answers=answers,
        survival_curves=curves,
        status_margin=margin,
        pooled=pooled.reshape(n_scans, n_questions, -1),
    )


@torch.no_grad()
def score_naive(
    model: VisionLanguageSurvivalModel,
    scans: Sequence[ScanInput],
    questions: Sequence[str],
    pool: str = "prompt",
    options: DecodeOptions | None = None,
) -> EnsembleOutput:
    """Reference path: per (scan, question) ``generate`` then one full forward pass of prompt + answer."""
    options = options or DecodeOptions()
    _check(model, scans, questions, pool)
    processor, device = model.processor, model.language_model.get_input_embeddings().weight.device
    eos = processor.eos_token_id
    pooled, answers = [], []
    for scan in scans:
        image = scan.image_tokens[None]
        answers.append([])
        for question in questions:
            prompt = processor.prompt_ids(scan.clinical, question)
            answer_ids: list[int] = []
            if options.generate:
                ids = torch.tensor([prompt], device=device)
                new = model.generate(
                    ids,
                    torch.ones_like(ids),
                    image,
                    options.max_new_tokens,
                    options.do_sample,
                    options.temperature,
                )[0].tolist()
                answer_ids = new[: new.index(eos) + 1] if eos in new else new
            answers[-1].append(_decode_answers(model, [answer_ids])[0] if options.generate else "")
            item = processor.from_ids(prompt, answer_ids)
            ids, mask = item["input_ids"][None].to(device), item["attention_mask"][None].to(device)
            pool_mask = item["prompt_mask"][None].to(device) if pool == "prompt" else None
            pooled.append(model(ids, mask, image, pool_mask=pool_mask).z_pooled)
    risks, curves = survival_outputs(
        model, torch.cat(pooled), (len(scans), len(questions)), scan_covariates(scans)
    )
    return EnsembleOutput(risks=risks, answers=answers, survival_curves=curves)
