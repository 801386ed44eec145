"""One validator and one CLI builder for every config dataclass: Literal choices, declared ranges, field
docs."""

from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass, field
from typing import Literal, get_args, get_type_hints

import pytest

from vlsurv.baselines.run import BaselinesConfig
from vlsurv.baselines.table import TableConfig
from vlsurv.config import (
    ConfigError,
    add_config_arguments,
    bounded,
    check_fields,
    config_from_args,
    field_docs,
    from_dict,
    load_config,
)
from vlsurv.data.transforms import PreprocessConfig
from vlsurv.demo import DemoConfig
from vlsurv.encoders.merlin import EncoderConfig
from vlsurv.encoders.pretrain import EncoderPretrainConfig
from vlsurv.evaluate import EvaluationConfig
from vlsurv.horizon.config import HorizonConfig
from vlsurv.losses import TIES, Ties
from vlsurv.model.ensemble import DecodeOptions
from vlsurv.model.model_config import Dtype, LoRAConfig, ModelConfig
from vlsurv.model.survival import SurvivalConfig, SurvivalHead
from vlsurv.model.vlm_io import DTYPES
from vlsurv.predict import PredictConfig
from vlsurv.training.config import (
    CheckpointConfig,
    DataConfig,
    EvalConfig,
    LossConfig,
    OptimConfig,
    TrainConfig,
)
from vlsurv.tte.config import TTEDataConfig, TTEModelConfig, TTEOptimConfig, TTEPretrainConfig, TTETaskConfig

CONFIGS = [
    TrainConfig,
    DataConfig,
    OptimConfig,
    LossConfig,
    EvalConfig,
    CheckpointConfig,
    ModelConfig,
    LoRAConfig,
    SurvivalConfig,
    PredictConfig,
    EvaluationConfig,
    DemoConfig,
    PreprocessConfig,
    EncoderConfig,
    EncoderPretrainConfig,
    DecodeOptions,
    TTEPretrainConfig,
    TTEDataConfig,
    TTETaskConfig,
    TTEModelConfig,
    TTEOptimConfig,
    HorizonConfig,
    BaselinesConfig,
    TableConfig,
]


@dataclass
class Inner:
    rate: float = bounded(0.5, ge=0.0, lt=1.0, what="a fraction")
    """A fraction."""

    def __post_init__(self) -> None:
        check_fields(self, "inner")


@dataclass
class Outer:
    mode: Literal["a", "b"] = "a"
    """The mode."""
    pool: Literal["x", "y"] | None = None
    """A choice or null."""
    count: int = bounded(3, ge=1, reason="at least one is needed")
    """How many."""
    sigma: float | None = bounded(None, gt=0.0)
    """A positive scale or null (50% of the spread is a fair start)."""
    pair: tuple[float, float] = bounded((0.1, 0.2), ge=0.0, le=1.0, what="two values")
    """Two values in [0, 1]."""
    tags: list[str] = field(default_factory=lambda: ["x"])
    """Tags; the option alone gives none."""
    inner: Inner = field(default_factory=Inner)
    """A nested section."""

    def __post_init__(self) -> None:
        check_fields(self)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"mode": "c"}, "mode: expected one of ['a', 'b'], got 'c'"),
        ({"pool": "z"}, "pool: expected one of ['x', 'y'] or null, got 'z'"),
        ({"count": 0}, "count: expected a value >= 1 (at least one is needed), got 0"),
        ({"sigma": 0.0}, "sigma: expected a value > 0 or null, got 0.0"),
        ({"pair": (0.5, 1.5)}, "pair: expected two values in [0, 1], got [0.5, 1.5]"),
    ],
)
def test_check_fields_names_the_field_and_what_was_expected(kwargs, message):
    with pytest.raises(ConfigError) as caught:
        Outer(**kwargs)
    assert str(caught.value) == message
    assert Outer(pool="y", sigma=2.0, pair=(0.0, 1.0)).pool == "y"


def test_a_nested_section_is_named_by_its_key_alone_or_by_its_full_dotted_key_and_file():
    with pytest.raises(ConfigError) as caught:
        Inner(rate=1.0)
    assert str(caught.value) == "inner.rate: expected a fraction in [0, 1), got 1.0"
    with pytest.raises(ConfigError) as caught:
        from_dict(Outer, {"inner": {"rate": -0.5}}, source="run.yaml")
    assert str(caught.value) == "inner.rate in run.yaml: expected a fraction in [0, 1), got -0.5"
    with pytest.raises(ConfigError) as caught:
        load_config(TrainConfig, None, ["model.survival.adapter_reduction=0"])
    assert str(caught.value) == "model.survival.adapter_reduction: expected a value >= 1, got 0"


def test_every_config_field_has_a_one_line_docstring():
    for cls in CONFIGS:
        docs = field_docs(cls)
        missing = [f.name for f in dataclasses.fields(cls) if not docs.get(f.name)]
        assert not missing, f"{cls.__name__}: fields without a docstring: {missing}"
    assert field_docs(Outer)["pool"] == "A choice or null."


def test_choices_have_one_source():
    assert set(get_args(Dtype)) == set(DTYPES)
    assert get_type_hints(DemoConfig)["head"] == SurvivalHead
    assert get_type_hints(LossConfig)["ties"] is Ties and TIES == ("breslow", "efron")
    with pytest.raises(
        ConfigError, match=r"^loss\.ties: expected one of \['breslow', 'efron'\], got 'exact'"
    ):
        LossConfig(ties="exact")


def test_config_defaults_are_unchanged():
    optim, loss = OptimConfig(), LossConfig()
    assert (optim.lr_lora, optim.betas, optim.warmup_steps, optim.batch_size, optim.grad_accum) == (
        1e-6,
        (0.9, 0.999),
        500,
        12,
        8,
    )
    assert (loss.alpha, loss.lambda_d, loss.ties, loss.risk_set, loss.memory_batches) == (
        0.5,
        1.0,
        "breslow",
        "micro_batch",
        7,
    )
    assert (ModelConfig().num_image_tokens, ModelConfig().max_seq_len, SurvivalConfig().adapter_ratio) == (
        49,
        1024,
        0.2,
    )
    assert (PredictConfig().batch_scans, EvaluationConfig().horizons, DemoConfig().n_patients) == (
        8,
        (365.0, 1095.0, 1825.0),
        300,
    )


def test_cli_options_come_from_the_dataclass():
    parser = argparse.ArgumentParser()
    add_config_arguments(parser, Outer, required=("mode",), flags={"count": "--n"}, skip=("inner",))
    help_text = parser.format_help()
    for flag in ("--mode {a,b}", "--pool {x,y}", "--n N", "--sigma", "--pair FLOAT FLOAT"):
        assert flag in help_text
    assert "How many. (default: 3)" in help_text and "--inner" not in help_text
    assert "(50% of the spread is a fair start)" in " ".join(help_text.split())  # a % is not a format
    assert config_from_args(Outer, parser.parse_args(["--mode", "a", "--tags"])).tags == []
    with pytest.raises(SystemExit):
        parser.parse_args([])  # --mode is required
    config = config_from_args(Outer, parser.parse_args(["--mode", "b", "--pair", "0.3", "0.4"]))
    assert config == Outer(mode="b", pair=(0.3, 0.4))
    with pytest.raises(ConfigError, match=r"^count in command line: expected a value >= 1"):
        config_from_args(Outer, parser.parse_args(["--mode", "a", "--n", "0"]))


def test_evaluate_and_demo_options_default_to_their_dataclass():
    parser = argparse.ArgumentParser()
    add_config_arguments(parser, EvaluationConfig, flags={"n_examples": "--examples"})
    assert config_from_args(EvaluationConfig, parser.parse_args([])) == EvaluationConfig()
    args = parser.parse_args(["--horizons", "100", "200", "--examples", "2", "--skip-invalid-horizons"])
    assert config_from_args(EvaluationConfig, args) == EvaluationConfig(
        horizons=(100.0, 200.0), n_examples=2, skip_invalid_horizons=True
    )
    parser = argparse.ArgumentParser()
    add_config_arguments(parser, DemoConfig, skip=("train_overrides",))
    assert config_from_args(DemoConfig, parser.parse_args([]), train_overrides=[]) == DemoConfig()
    args = parser.parse_args(["--no-progress", "--head", "deephit", "--volume-shape", "32", "32", "16"])
    assert config_from_args(DemoConfig, args, train_overrides=[]) == DemoConfig(
        progress=False, head="deephit", volume_shape=(32, 32, 16)
    )


FLAGS_BEFORE = {  # every option these commands had when their parsers were written by hand
    "predict": [
        "--model",
        "--manifest",
        "--cache",
        "--out",
        "--pool",
        "--generate",
        "--no-generate",
        "--questions",
        "--split",
        "--batch-scans",
        "--max-new-tokens",
        "--do-sample",
        "--temperature",
        "--seed",
        "--device",
    ],
    "evaluate": [
        "--predictions",
        "--manifest",
        "--vqa",
        "--out",
        "--horizons",
        "--skip-invalid-horizons",
        "--split",
        "--bootstrap",
        "--bertscore-model",
        "--bertscore-layers",
        "--bertscore-samples",
        "--examples",
        "--seed",
        "--patient-level",
        "--scan-order-column",
    ],
    "demo": ["--out", "--n-patients", "--seed", "--head", "--no-progress", "key=value"],
}


@pytest.mark.parametrize("command", sorted(FLAGS_BEFORE))
def test_help_lists_every_earlier_flag(command, capsys):
    from vlsurv.cli import main

    with pytest.raises(SystemExit):
        main([command, "--help"])
    help_text = capsys.readouterr().out
    missing = [flag for flag in FLAGS_BEFORE[command] if flag not in help_text]
    assert not missing, f"vlsurv {command} --help lacks {missing}"
