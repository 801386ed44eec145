"""TrainConfig: every shipped YAML resolves, launch commands are exact, bad values are rejected naming the
key."""

from __future__ import annotations

import shlex
from pathlib import Path

import pytest

from vlsurv.config import ConfigError, save_config
from vlsurv.training.config import TrainConfig, load_train_config
from vlsurv.training.setup import RunData, deephit_cuts, stage1_paths
from vlsurv.tte.config import is_tte_config, load_tte_config

ROOT = Path(__file__).resolve().parents[1]
TRAIN_CONFIGS = sorted(ROOT.glob("configs/*.yaml")) + sorted(ROOT.glob("configs/tiny/*.yaml"))
ACCELERATE_CONFIGS = sorted(ROOT.glob("configs/accelerate/*.yaml"))
STAGE2 = ROOT / "configs/tiny/stage2_deephit.yaml"


def test_the_shipped_configs_are_all_there():
    names = {p.relative_to(ROOT).as_posix() for p in TRAIN_CONFIGS + ACCELERATE_CONFIGS}
    assert {
        "configs/stage1.yaml",
        "configs/stage2_deepsurv.yaml",
        "configs/stage2_deephit.yaml",
        "configs/tiny/stage1.yaml",
        "configs/tiny/stage2_deepsurv.yaml",
        "configs/tiny/stage2_deephit.yaml",
        "configs/accelerate/single_gpu.yaml",
        "configs/accelerate/multi_gpu_ddp.yaml",
        "configs/accelerate/fsdp.yaml",
        "configs/accelerate/deepspeed_zero2.yaml",
    } <= names


@pytest.mark.parametrize("path", TRAIN_CONFIGS, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_training_config_resolves_and_its_first_line_launches_it(path, tmp_path):
    load = load_tte_config if is_tte_config(path) else load_train_config  # stage: tte_pretrain (vlsurv.tte)
    config = load(path)
    first = path.read_text().splitlines()[0]
    assert first.startswith("# accelerate launch ")
    argv = shlex.split(first[2:])
    assert argv[argv.index("--config") + 1] == path.relative_to(ROOT).as_posix()
    script = next(a for a in argv if a.endswith(".py"))
    assert (ROOT / script).is_file()
    if "--config_file" in argv:
        assert (ROOT / argv[argv.index("--config_file") + 1]).is_file()
    resolved = save_config(config, tmp_path / "config.yaml")
    assert load(resolved) == config


def test_full_size_configs_carry_the_paper_defaults():
    for name in ("stage1", "stage2_deepsurv", "stage2_deephit"):
        config = load_train_config(ROOT / f"configs/{name}.yaml")
        optim = config.optim
        assert (optim.lr_lora, optim.lr_projector, optim.lr_survival) == (1e-6, 1e-6, 1e-6)
        assert (optim.batch_size, optim.grad_accum, optim.warmup_steps) == (12, 8, None)
        assert optim.warmup_ratio == (0.05 if name == "stage1" else 0.1)
        assert tuple(optim.betas) == (0.9, 0.999) and optim.scheduler == "cosine"
        assert config.mixed_precision == "bf16" and config.model.num_image_tokens == 49
        assert config.loss.alpha == 0.5 and config.loss.lambda_d == 1.0 and config.loss.lambda_a == 1.0
    assert load_train_config(ROOT / "configs/stage2_deephit.yaml").model.survival.head == "deephit"


@pytest.mark.parametrize("path", ACCELERATE_CONFIGS, ids=lambda p: p.name)
def test_accelerate_config_is_read_by_accelerate(path):
    from accelerate.commands.config.config_args import ClusterConfig

    first = path.read_text().splitlines()[0]
    argv = shlex.split(first[2:])
    assert argv[:2] == ["accelerate", "launch"] and argv[argv.index("--config_file") + 1] == (
        path.relative_to(ROOT).as_posix()
    )
    assert (ROOT / argv[argv.index("--config") + 1]).is_file()
    cluster = ClusterConfig.from_yaml_file(str(path))
    expected = {
        "single_gpu": "NO",
        "multi_gpu_ddp": "MULTI_GPU",
        "fsdp": "FSDP",
        "deepspeed_zero2": "DEEPSPEED",
    }
    assert str(cluster.distributed_type.value) == expected[path.stem]


def test_overrides_are_typed_and_applied():
    config = load_train_config(
        ROOT / "configs/stage1.yaml", ["optim.lr_lora=2e-5", "model.decoder_path=/m/x"]
    )
    assert config.optim.lr_lora == 2e-5 and config.model.decoder_path == "/m/x"


def test_unknown_key_is_named():
    with pytest.raises(ConfigError, match=r"unknown key optim\.lr_lorra in .*stage1\.yaml"):
        load_train_config(ROOT / "configs/stage1.yaml", ["optim.lr_lorra=1e-4"])


@pytest.mark.parametrize("key", ["lr_projector", "lr_lora", "lr_survival"])
def test_negative_learning_rate_is_rejected(key):
    with pytest.raises(
        ConfigError, match=rf"optim\.{key} in .*stage1\.yaml: expected a learning rate >= 0, got -1e-06"
    ):
        load_train_config(ROOT / "configs/stage1.yaml", [f"optim.{key}=-1e-6"])


def test_other_bad_values_name_their_key():
    with pytest.raises(
        ConfigError, match=r"sampling: expected one of \['patient_balanced', 'pairs', 'answer_balanced'\]"
    ):
        TrainConfig(sampling="random")
    with pytest.raises(
        ConfigError, match=r"optim\.batch_size in .*stage1\.yaml: expected a value >= 1, got 0"
    ):
        load_train_config(ROOT / "configs/stage1.yaml", ["optim.batch_size=0"])
    with pytest.raises(
        ConfigError,
        match=r"optim\.betas in .*stage1\.yaml: expected two values in \[0, 1\), got \[0\.9, 1\.5\]",
    ):
        load_train_config(ROOT / "configs/stage1.yaml", ["optim.betas=[0.9, 1.5]"])


def test_stage2_without_a_stage1_projector_is_rejected(tmp_path):
    with pytest.raises(ConfigError, match=r"data\.stage1_dir: stage 2 needs the stage-1 model directory"):
        load_train_config(STAGE2, ["data.stage1_dir=''"])
    config = load_train_config(STAGE2, [f"data.stage1_dir={tmp_path}"])
    with pytest.raises(ConfigError, match=rf"data\.stage1_dir {tmp_path}: no projector\.safetensors"):
        stage1_paths(config)


def test_deephit_without_cuts_is_rejected():
    with pytest.raises(
        ConfigError,
        match=r"model\.survival\.num_bins in .*stage2_deephit\.yaml: expected a value >= 1, got 0",
    ):
        load_train_config(STAGE2, ["model.survival.num_bins=0"])
    with pytest.raises(
        ConfigError, match=r"deephit_cuts: got 2 cut times, expected model\.survival\.num_bins = 4"
    ):
        load_train_config(STAGE2, ["deephit_cuts=[30, 90]"])
    with pytest.raises(ConfigError, match=r"deephit_cuts: expected strictly increasing positive times"):
        load_train_config(STAGE2, ["deephit_cuts=[30, 20, 90, 100]"])
    with pytest.raises(ConfigError, match=r"deephit_cuts: given, but model\.survival\.head is not 'deephit'"):
        load_train_config(STAGE2, ["model.survival.head=deepsurv", "deephit_cuts=[1, 2, 3, 4]"])
    no_events = RunData(train=None, val=None, train_time=[10.0, 20.0, 30.0], train_event=[0, 0, 0])
    config = load_train_config(STAGE2)
    with pytest.raises(
        ConfigError, match=r"cannot compute the DeepHit cuts from the 'train' split .*no event"
    ):
        deephit_cuts(config, no_events)
    given = load_train_config(STAGE2, ["deephit_cuts=[10, 20, 30, 40]"])
    assert deephit_cuts(given, no_events).cuts.tolist() == [10.0, 20.0, 30.0, 40.0]


@pytest.mark.parametrize(
    ("censoring", "placement"),
    [
        ("interpolate", "event_quantiles_with_tail"),
        ("deephit", "event_quantiles"),
        ("pycox", "event_quantiles"),
    ],
)
def test_deephit_cuts_carry_the_configured_scheme(censoring, placement):
    data = RunData(train=None, val=None, train_time=[10.0, 20.0, 30.0, 40.0, 50.0, 60.0], train_event=[1] * 6)
    overrides = [
        f"model.survival.deephit_censoring={censoring}",
        f"model.survival.deephit_cut_placement={placement}",
    ]
    cuts = deephit_cuts(load_train_config(STAGE2, overrides), data)
    assert (cuts.censoring, cuts.placement) == (censoring, placement)
    assert cuts.cuts[-1] == (60.0 if placement == "event_quantiles" else 50.0)  # the 4/4 or the 4/5 quantile
    given = deephit_cuts(load_train_config(STAGE2, [*overrides, "deephit_cuts=[10, 20, 30, 40]"]), data)
    assert (given.censoring, given.placement) == (censoring, None)
