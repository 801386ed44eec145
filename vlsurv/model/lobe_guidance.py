"""Lobe guidance (``model.answer_guidance: lobe``): a linear classifier of the image tokens names the tumour's
lobe in a ``findings_first`` answer, and the decoder writes the rest.

The image tokens carry the lobe better than the decoder reads it: on the demo's tiny encoder a logistic
regression of the 16 x 256 tokens names the lobe of 72-87% of the test tumours over six seeds, while the
decoder's answers name it in 51-67% (it fits 157 of 162 training tumours). A classifier's finding turned into
the words the decoder continues from is PromptMRG's diagnosis-driven prompt (Jin et al., AAAI 2024).

- ``fit_lobe_classifier``: multinomial logistic regression on the flattened, standardised image tokens of the
  training scans whose reference tumour answer names one lobe (``vlsurv.training.answer_status.lobe_labels``).
  The objective is scikit-learn's ``LogisticRegression(C)`` (lbfgs, multinomial):
  min_{W, b} C * sum_i CE(W x_i + b, y_i) + ||W||^2 / 2, with x_i = (tokens_i - mean) / sd.
  It reads the encoder's frozen tokens only, so it is fitted once when training starts and is the same on
  every process.
- ``LobeGuide`` (``vlsurv.model.ensemble._generate_on_cache``): in a tumour answer, after the decoder's
  present / absent decision, the first side word ("right", "Left") and the level word after it ("upper") are
  chosen by the product of the classifier's and the decoder's probabilities, and the sentence's first naming
  of the lobe after the opening repeats them. Forcing only the opening ("Present, tumor, left upper lobe:")
  was not enough: the tiny decoder's sentence re-read the lobe from the image (seed 7: 30 of 53 test
  tumours' sentences named the classifier's lobe, against 27 of 53 unguided). The product beats either
  expert where they err apart (seed 42, the 54 test tumours: classifier 69%, decoder's opening 72%, product
  81%).

Saved with the model as ``lobe_classifier.safetensors`` (weight (5, F), bias (5,), mean (F,), scale (F,)).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from vlsurv.errors import ModelLoadError
from vlsurv.metrics_clinical import LOBE_NAMES, LOBE_QUESTION
from vlsurv.model.model_config import ModelConfigError

FILE_NAME = "lobe_classifier.safetensors"
#: scikit-learn's default inverse regularisation is 1; 0.05 is the demo probe's (seeds 1, 7, 42, 2024, 31337,
#: 0: 87, 72, 72, 73, 80, 85% of the test tumours' lobes; 0.005 and 0.5 give 67-85% and 70-87%).
DEFAULT_C = 0.05


class LobeClassifier(nn.Module):
    """Image tokens (B, T, C) -> lobe logits (B, 5) in ``LOBE_NAMES`` order; buffers only (never trained by an
    optimizer, kept out of the parameter groups)."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor, mean: torch.Tensor, scale: torch.Tensor):
        super().__init__()
        self.register_buffer("weight", weight.float())
        self.register_buffer("bias", bias.float())
        self.register_buffer("mean", mean.float())
        self.register_buffer("scale", scale.float())

    @property
    def num_features(self) -> int:
        return self.mean.numel()

    def forward(self, image_tokens: torch.Tensor) -> torch.Tensor:
        features = image_tokens.reshape(image_tokens.shape[0], -1).to(self.mean)
        if features.shape[1] != self.num_features:
            raise ValueError(
                f"lobe classifier: image tokens {tuple(image_tokens.shape[1:])} give {features.shape[1]} "
                f"features; it was fitted on {self.num_features}"
            )
        return ((features - self.mean) / self.scale) @ self.weight.T + self.bias

    def save(self, directory: str | Path) -> Path:
        from safetensors.torch import save_file

        path = Path(directory) / FILE_NAME
        save_file({k: v.detach().cpu().contiguous() for k, v in self.state_dict().items()}, str(path))
        return path

    @classmethod
    def load(cls, directory: str | Path) -> LobeClassifier:
        from safetensors.torch import load_file

        path = Path(directory) / FILE_NAME
        if not path.is_file():
            raise ModelLoadError(
                f"{path}: missing; a model with answer_guidance 'lobe' keeps its lobe classifier there"
            )
        state = load_file(str(path))
        expected = {"weight", "bias", "mean", "scale"}
        if set(state) != expected:
            raise ModelLoadError(f"{path}: tensors {sorted(state)}; expected {sorted(expected)}")
        return cls(**state)


def fit_multinomial(
    features: torch.Tensor, labels: torch.Tensor, num_classes: int, inverse_regularisation: float = DEFAULT_C
) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, F) features, (N,) labels in [0, num_classes) -> (W (K, F), b (K,)) minimising
    C * sum_i CE(W x_i + b, y_i) + ||W||^2 / 2 (scikit-learn's multinomial ``LogisticRegression``), by LBFGS
    in float64."""
    x, y = features.double(), labels.long()
    weight = torch.zeros(num_classes, x.shape[1], dtype=torch.float64, requires_grad=True)
    bias = torch.zeros(num_classes, dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.LBFGS(
        [weight, bias], lr=1.0, max_iter=500, tolerance_grad=1e-9, tolerance_change=1e-12,
        line_search_fn="strong_wolfe",
    )  # fmt: skip

    def objective() -> torch.Tensor:
        optimizer.zero_grad()
        loss = inverse_regularisation * F.cross_entropy(x @ weight.T + bias, y, reduction="sum")
        loss = loss + 0.5 * weight.pow(2).sum()
        loss.backward()
        return loss

    optimizer.step(objective)
    return weight.detach(), bias.detach()


def fit_lobe_classifier(
    image_tokens: torch.Tensor, labels: torch.Tensor, inverse_regularisation: float = DEFAULT_C
) -> LobeClassifier:
    """Fit on (N, T, C) image tokens and (N,) lobe indices (``LOBE_NAMES``); features standardised with the
    scans' mean and sd (sd 1 where a feature is constant)."""
    if image_tokens.shape[0] != labels.shape[0] or image_tokens.shape[0] == 0:
        raise ValueError(
            f"lobe classifier: {image_tokens.shape[0]} scans of tokens and {labels.shape[0]} labels; "
            "expected the same number, at least one"
        )
    features = image_tokens.reshape(image_tokens.shape[0], -1).double()
    mean, scale = features.mean(0), features.std(0, unbiased=False)
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    weight, bias = fit_multinomial((features - mean) / scale, labels, len(LOBE_NAMES), inverse_regularisation)
    return LobeClassifier(weight, bias, mean, scale)


class LobeWords:
    """The tokens that name a lobe's side and level in answers ("Right upper lobe", "in the left lower
    lobe"), per spelling form, for ``LobeGuide``. Only forms that the tokenizer
    keeps as one token per word inside a sentence are guided ("right" / "left", "Right" / "Left", "upper" /
    "middle" / "lower", ...); ModelConfigError for a tokenizer without a side and a level form."""

    SIDES = ("right", "left")
    LEVELS = ("upper", "middle", "lower")

    def __init__(self, tokenizer) -> None:
        def word_ids(word: str) -> list[int]:
            """The ids of ``word`` inside a sentence ("a right" less "a"; "Ġright" for byte-level BPE,
            "▁right" for SentencePiece)."""
            head = tokenizer("a", add_special_tokens=False)["input_ids"]
            full = tokenizer(f"a {word}", add_special_tokens=False)["input_ids"]
            return full[len(head) :] if full[: len(head)] == head else []

        def forms(words: tuple[str, ...]) -> list[list[int]]:
            table = []
            for spelled in (words, tuple(word.capitalize() for word in words)):
                ids = [word_ids(word) for word in spelled]
                if all(len(one) == 1 for one in ids):
                    table.append([one[0] for one in ids])
            return table

        self.side_forms, self.level_forms = forms(self.SIDES), forms(self.LEVELS)
        if not self.side_forms or not self.level_forms:
            raise ModelConfigError(
                f"answer_guidance 'lobe': the tokenizer writes {self.SIDES} or {self.LEVELS} with several "
                "tokens per word in every spelling; lobe guidance needs one token per word"
            )
        self.lobe_side = [self.SIDES.index(name.split()[0]) for name in LOBE_NAMES]
        self.lobe_level = [self.LEVELS.index(name.split()[1]) for name in LOBE_NAMES]
        table = torch.full((len(self.SIDES), len(self.LEVELS)), -1, dtype=torch.long)
        table[self.lobe_side, self.lobe_level] = torch.arange(len(LOBE_NAMES))
        self.lobe_table = table
        """(side, level) -> lobe index in ``LOBE_NAMES``, -1 for no lobe (the left has no middle lobe)."""


class LobeGuide:
    """The guided decoding of N answer rows (``LobeWords`` of the tokenizer; (N, 5) lobe log-probabilities of
    the classifier, (N,) rows to guide), one ``step`` per generated token.

    The lobe is the product of two experts, the classifier and the decoder, decided word by word: at a guided
    row's first side word, side = argmax_s log p_dec(s) + log sum_{lobes l of s} p_clf(l), with p_dec the
    decoder's next-token probability of that spelling of s; at the level word right after it,
    level = argmax_v log p_dec(v) + log p_clf(lobe(side, v)). The second side word (the sentence's first
    naming of the lobe after the opening's) and the level word after it repeat the decision; later side words
    are left as written, since they may name something else ("abutting the left atrium")."""

    MENTIONS = 2
    """Side words guided per answer: the opening's naming of the lobe and the sentence's first."""

    def __init__(self, words: LobeWords, log_probs: torch.Tensor, guided: torch.Tensor) -> None:
        self.log_probs, self.guided = log_probs.float(), guided
        device = log_probs.device
        self.lobe_table = words.lobe_table.to(device)
        self.side_forms = [torch.tensor(form, device=device) for form in words.side_forms]
        self.level_forms = [torch.tensor(form, device=device) for form in words.level_forms]
        lobe_side = torch.tensor(words.lobe_side, device=device)
        self.side_scores = torch.stack(
            [torch.logsumexp(self.log_probs[:, lobe_side == s], -1) for s in range(len(words.SIDES))], -1
        )
        self.side = torch.full(guided.shape, -1, dtype=torch.long, device=device)
        self.level = torch.full(guided.shape, -1, dtype=torch.long, device=device)
        self.mentions = torch.zeros(guided.shape, dtype=torch.long, device=device)
        self.after_side = torch.zeros_like(guided)
        """Whether each row's previous token was a guided side word."""

    def step(self, token: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        """(N,) tokens the decoder picked and (N, V) this step's logits -> (N,) tokens whose guided side and
        level words name the decided lobe."""
        after_side, self.after_side = self.after_side, torch.zeros_like(self.after_side)
        for ids in self.side_forms:
            hit = self.guided & (self.mentions < self.MENTIONS) & torch.isin(token, ids)
            new = hit & (self.side < 0)
            if bool(new.any()):
                decoder = torch.log_softmax(logits[new].float(), -1)[:, ids]
                self.side[new] = (decoder + self.side_scores[new]).argmax(-1)
            token = torch.where(hit, ids[self.side.clamp(min=0)], token)
            self.mentions += hit.long()
            self.after_side |= hit
        for ids in self.level_forms:
            hit = after_side & torch.isin(token, ids)
            new = hit & (self.level < 0)
            if bool(new.any()):
                lobes = self.lobe_table[self.side[new]]
                classifier = self.log_probs[new].gather(1, lobes.clamp(min=0))
                classifier = classifier.masked_fill(lobes < 0, float("-inf"))
                decoder = torch.log_softmax(logits[new].float(), -1)[:, ids]
                self.level[new] = (decoder + classifier).argmax(-1)
            token = torch.where(hit, ids[self.level.clamp(min=0)], token)
        return token


def guided_lobes(
    classifier: LobeClassifier, image_tokens: torch.Tensor, question_ids: Sequence[str]
) -> tuple[torch.Tensor, torch.Tensor]:
    """For S scans' (S, T, C) tokens and Q question ids, scan-major over the S * Q answers: the classifier's
    (S * Q, 5) lobe log-probabilities and (S * Q,) whether the answer is guided (the tumour question's)."""
    with torch.no_grad():
        log_probs = torch.log_softmax(classifier(image_tokens), -1)
    is_tumour = torch.tensor([qid == LOBE_QUESTION for qid in question_ids], device=log_probs.device)
    return log_probs.repeat_interleave(len(question_ids), 0), is_tumour.repeat(image_tokens.shape[0])
