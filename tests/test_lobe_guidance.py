"""model.answer_guidance "lobe": the multinomial logistic regression against scikit-learn on iris, the saved
classifier, the side / level word guidance on a trained tokenizer, guided decoding on the tiny decoder, the
config checks and a tiny stage-1 run that fits, saves and reloads the classifier."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import TINY_TEXTS, build_tiny_inputs, tiny_config
from sklearn.datasets import load_iris
from sklearn.linear_model import LogisticRegression

import vlsurv.model.ensemble as ensemble
from vlsurv.config import ConfigError
from vlsurv.demo import DemoConfig
from vlsurv.errors import ModelLoadError
from vlsurv.metrics_clinical import LOBE_NAMES, named_lobes
from vlsurv.model import ModelConfig, VisionLanguageSurvivalModel
from vlsurv.model.ensemble import DecodeOptions, ScanInput, score_shared_prefix
from vlsurv.model.lobe_guidance import (
    FILE_NAME,
    LobeClassifier,
    LobeGuide,
    LobeWords,
    fit_lobe_classifier,
    fit_multinomial,
    guided_lobes,
)
from vlsurv.model.model_config import ModelConfigError
from vlsurv.model.tiny import build_tiny_decoder, train_tokenizer
from vlsurv.training.answer_status import lobe_labels
from vlsurv.training.loop import Trainer

RUL, LLL = LOBE_NAMES.index("right upper lobe"), LOBE_NAMES.index("left lower lobe")


@pytest.mark.parametrize("c", [0.05, 1.0])
def test_fit_multinomial_is_scikit_learns_logistic_regression_on_iris(c):
    x, y = load_iris(return_X_y=True)
    x = (x - x.mean(0)) / x.std(0)
    reference = LogisticRegression(C=c, tol=1e-10, max_iter=10_000).fit(x, y)
    weight, bias = fit_multinomial(torch.tensor(x), torch.tensor(y), 3, c)
    np.testing.assert_allclose(weight.numpy(), reference.coef_, atol=1e-4)
    np.testing.assert_allclose(
        bias.numpy() - bias.numpy().mean(), reference.intercept_ - reference.intercept_.mean(), atol=1e-4
    )
    probabilities = torch.softmax(torch.tensor(x) @ weight.T + bias, -1).numpy()
    np.testing.assert_allclose(probabilities, reference.predict_proba(x), atol=1e-5)


def test_lobe_classifier_standardises_learns_saves_and_names_its_errors(tmp_path):
    generator = torch.Generator().manual_seed(0)
    labels = torch.arange(40) % 5
    tokens = torch.randn(40, 2, 5, generator=generator) * 0.1
    tokens[torch.arange(40), 0, labels] += 1.0  # one feature per lobe
    tokens[:, 1, 4] = 7.0  # a constant feature: scale 1
    classifier = fit_lobe_classifier(tokens, labels)
    assert classifier.scale[9] == 1.0 and classifier.mean[9] == pytest.approx(7.0)
    assert torch.equal(classifier(tokens).argmax(-1), labels)
    classifier.save(tmp_path)
    loaded = LobeClassifier.load(tmp_path)
    assert torch.equal(loaded(tokens), classifier(tokens))
    with pytest.raises(ValueError, match=r"image tokens \(3, 3\) give 9 features; it was fitted on 10"):
        classifier(torch.zeros(1, 3, 3))
    with pytest.raises(ValueError, match="3 scans of tokens and 2 labels; expected the same number"):
        fit_lobe_classifier(tokens[:3], labels[:2])
    with pytest.raises(ModelLoadError, match=rf"{FILE_NAME}: missing; a model with answer_guidance 'lobe'"):
        LobeClassifier.load(tmp_path / "elsewhere")
    from safetensors.torch import save_file

    save_file({"weight": torch.zeros(5, 10)}, str(tmp_path / FILE_NAME))
    with pytest.raises(
        ModelLoadError, match=r"tensors \['weight'\]; expected \['bias', 'mean', 'scale', 'weight'\]"
    ):
        LobeClassifier.load(tmp_path)


LOBE_TEXTS = [
    f"Mass. {side.capitalize()} {level} lobe mass. A mass in the {side} {level} lobe. No {side} hilar node."
    for side in ("right", "left")
    for level in ("upper", "middle", "lower")
]


@pytest.fixture(scope="module")
def lobe_tokenizer():
    """A byte-level BPE tokenizer trained on lobe sentences: the side and level words are single tokens."""
    return train_tokenizer(LOBE_TEXTS * 20, vocab_size=500)


def _ids(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def _decode_guided(tokenizer, guide: LobeGuide, text: str, logits_of=None) -> str:
    """``text``'s tokens as a decoder's picks, stepped through ``guide`` (``logits_of(token)``: that step's
    (V,) logits; uniform by default)."""
    out = []
    for token in _ids(tokenizer, text):
        logits = torch.zeros(1, len(tokenizer)) if logits_of is None else logits_of(token)[None]
        out.append(int(guide.step(torch.tensor([token]), logits)))
    return tokenizer.decode(out)


def _log_probs(**lobes: float) -> torch.Tensor:
    """(1, 5) log-probabilities of the named lobes (codes), the rest sharing what is left."""
    p = torch.full((5,), (1 - sum(lobes.values())) / (5 - len(lobes)))
    for code, value in lobes.items():
        p[["RUL", "RML", "RLL", "LUL", "LLL"].index(code)] = value
    return p.log()[None]


def test_lobe_guide_names_the_classifiers_lobe_when_the_decoder_has_no_preference(lobe_tokenizer):
    words = LobeWords(lobe_tokenizer)
    assert len(words.side_forms) == 2 and len(words.level_forms) >= 1  # " right" and " Right", ...
    text = " Left lower lobe mass. A mass in the left middle lobe. No left hilar node."
    for log_probs, guided, expected in (
        (
            _log_probs(RUL=0.9),
            True,
            " Right upper lobe mass. A mass in the right upper lobe. No left hilar node.",
        ),
        (
            _log_probs(LLL=0.9),
            True,
            " Left lower lobe mass. A mass in the left lower lobe. No left hilar node.",
        ),
        (_log_probs(RUL=0.9), False, text),
    ):
        guide = LobeGuide(words, log_probs, torch.tensor([guided]))
        assert _decode_guided(lobe_tokenizer, guide, text) == expected
    # a level word that does not follow a side word ("upper" in "the upper mediastinum") is left alone
    guide = LobeGuide(words, _log_probs(LLL=0.9), torch.tensor([True]))
    assert _decode_guided(lobe_tokenizer, guide, " the upper lobe") == " the upper lobe"
    with pytest.raises(
        ModelConfigError, match="several tokens per word in every spelling; lobe guidance needs one"
    ):
        LobeWords(train_tokenizer(["a b c d e f g"] * 5, vocab_size=270))


def test_lobe_guide_is_the_product_of_the_classifier_and_the_decoder(lobe_tokenizer):
    words = LobeWords(lobe_tokenizer)
    right, left = words.side_forms[0]
    upper, _, lower = words.level_forms[0]

    def decoder(favoured: dict[int, float]):
        def logits_of(token: int) -> torch.Tensor:
            logits = torch.zeros(len(lobe_tokenizer))
            for favoured_token, logit in favoured.items():
                logits[favoured_token] = logit
            return logits

        return logits_of

    # sides even in the classifier (RUL + 2 x 0.05 = LUL + 0.05 = 0.5): the decoder's "left" decides the side;
    # then LUL 0.45 against LLL 0.05 (log-odds 2.2) outweighs the decoder's "lower" (log-odds 1)
    even_sides = _log_probs(RUL=0.4, LUL=0.45)
    guide = LobeGuide(words, even_sides, torch.tensor([True]))
    text = " A mass in the right lower lobe. The right lower lobe mass."
    decided = _decode_guided(lobe_tokenizer, guide, text, decoder({left: 3.0, lower: 1.0}))
    assert decided == " A mass in the left upper lobe. The left upper lobe mass."
    # a decoder sure of "lower" (log-odds 4) outweighs the classifier's 2.2
    guide = LobeGuide(words, even_sides, torch.tensor([True]))
    assert _decode_guided(lobe_tokenizer, guide, text, decoder({left: 3.0, lower: 4.0})).startswith(
        " A mass in the left lower"
    )
    # the decision is made once: the next naming repeats it whatever the decoder then prefers, and a third
    # side word is left as written (it may name something else)
    guide = LobeGuide(words, _log_probs(RLL=0.9), torch.tensor([True]))
    first = _decode_guided(lobe_tokenizer, guide, " Right lower lobe.")
    assert first == " Right lower lobe." and guide.side.tolist() == [0] and guide.level.tolist() == [2]
    later = _decode_guided(lobe_tokenizer, guide, " the left upper lobe.", decoder({left: 9.0, upper: 9.0}))
    assert later == " the right lower lobe."
    assert _decode_guided(lobe_tokenizer, guide, " the left hilar node.") == " the left hilar node."
    assert lobe_tokenizer.decode([right, lower]) == " right lower"


def test_guided_lobes_are_scan_major_and_only_for_the_tumour_question():
    classifier = LobeClassifier(torch.eye(5, 2) * 3.0, torch.zeros(5), torch.zeros(2), torch.ones(2))
    tokens = torch.tensor([[[1.0, 0.0]], [[0.0, 1.0]]])  # scan 0 -> lobe 0, scan 1 -> lobe 1
    log_probs, guided = guided_lobes(classifier, tokens, ["pleura", "tumor", "bone"])
    assert guided.tolist() == [False, True, False, False, True, False]
    assert log_probs.shape == (6, 5) and log_probs.argmax(-1).tolist() == [0, 0, 0, 1, 1, 1]
    torch.testing.assert_close(log_probs[1], torch.log_softmax(classifier(tokens[:1]), -1)[0])


def test_answer_guidance_needs_findings_first(tiny_decoder_dir):
    with pytest.raises(
        ModelConfigError,
        match="answer_guidance 'lobe' .* model.answer_format is 'status_first'; expected 'findings_first'",
    ):
        ModelConfig(decoder_path=str(tiny_decoder_dir), answer_format="status_first", answer_guidance="lobe")
    with pytest.raises(
        ConfigError,
        match="give --answer-format findings_first or --answer-guidance none",
    ):
        DemoConfig(answer_format="status_first")


def _guided_model(decoder, lobe: int) -> VisionLanguageSurvivalModel:
    config = ModelConfig(
        decoder_path=str(decoder),
        image_token_dim=16,
        num_image_tokens=4,
        answer_format="findings_first",
        answer_guidance="lobe",
    )
    model = VisionLanguageSurvivalModel(config).eval()
    features = config.num_image_tokens * config.image_token_dim
    bias = torch.full((5,), -10.0)
    bias[lobe] = 10.0
    model.set_lobe_classifier(
        LobeClassifier(torch.zeros(5, features), bias, torch.zeros(features), torch.ones(features))
    )
    return model


def test_guided_decoding_names_the_classifiers_lobe_after_the_status_decision(tmp_path, monkeypatch):
    torch.manual_seed(0)
    texts = [
        *LOBE_TEXTS,
        "Present, tumor, right upper lobe: Absent, pleura: Where is the tumor? Any effusion?",
    ]
    model = _guided_model(
        build_tiny_decoder(tmp_path / "decoder", texts * 20, hidden_size=32, vocab_size=500), RUL
    )
    tokenizer, eos = model.tokenizer, model.processor.eos_token_id
    step, present, _ = model.status_decision()
    words = model.lobe_words  # the decoder's tokenizer keeps the words whole
    left, lower = words.side_forms[0][1], words.level_forms[0][2]
    script = [present] * (step + 1) + [left, lower, eos]
    calls = []

    def scripted(logits, options, generator, image_token_id):
        calls.append(1)
        return torch.full((logits.shape[0],), script[len(calls) - 1], dtype=torch.long)

    monkeypatch.setattr(ensemble, "_next_token", scripted)
    scans = [ScanInput("s0", "A 60 year-old.", torch.randn(4, 16))]
    result = score_shared_prefix(
        model, scans, ["Where is the tumor?", "Any effusion?"], "all", DecodeOptions(max_new_tokens=8),
        question_ids=["tumor", "pleura"],
    )  # fmt: skip
    tumour, pleura = result.answers[0]
    assert tumour.endswith(tokenizer.decode([words.side_forms[0][0], words.level_forms[0][0]]).strip())
    assert pleura.endswith(tokenizer.decode([left, lower]).strip())  # not the tumour question: as decoded
    assert named_lobes(tumour + " lobe") == {"RUL"} and named_lobes(pleura + " lobe") == {"LLL"}
    with pytest.raises(ModelConfigError, match="needs the fitted lobe classifier .* and the questions' ids"):
        score_shared_prefix(model, scans, ["Where is the tumor?"], "all", DecodeOptions(max_new_tokens=2))


@pytest.mark.slow
def test_stage1_fits_saves_and_reloads_the_lobe_classifier(tmp_path):
    inputs = build_tiny_inputs(tmp_path / "inputs")
    decoder = build_tiny_decoder(
        tmp_path / "decoder", (TINY_TEXTS + LOBE_TEXTS) * 4, hidden_size=64, vocab_size=500
    )
    config = tiny_config(
        "stage1",
        inputs,
        decoder,
        tmp_path / "run",
        "model.answer_format=findings_first",
        "model.answer_guidance=lobe",
        "optim.max_steps=4",
    )
    trainer = Trainer(config)
    model = trainer.accelerator.unwrap_model(trainer.model)
    labels = lobe_labels(trainer.data.train.samples)
    ids = sorted(labels)
    tokens = torch.stack([trainer.data.train.feature_cache.get(s).float() for s in ids])
    expected = fit_lobe_classifier(tokens, torch.tensor([labels[s] for s in ids]))
    assert torch.equal(model.lobe_classifier.weight, expected.weight)
    assert not any(name.startswith("lobe_classifier") for name, _ in model.named_parameters())
    final = trainer.fit()
    assert (final / FILE_NAME).is_file()
    reloaded = VisionLanguageSurvivalModel.from_pretrained(final)
    assert torch.equal(reloaded.lobe_classifier(tokens), expected(tokens))
    assert VisionLanguageSurvivalModel.from_pretrained(final, answer_guidance="none").lobe_classifier is None
    (final / FILE_NAME).unlink()
    with pytest.raises(ModelLoadError, match=rf"{FILE_NAME}: missing"):
        VisionLanguageSurvivalModel.from_pretrained(final)
