"""The typed-config machinery: YAML in, overrides, errors that name the key."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import pytest
import yaml

from vlsurv.config import ConfigError, apply_overrides, from_dict, load_config, save_config, to_dict


@dataclass
class Optim:
    lr: float = 1e-4
    betas: tuple[float, float] = (0.9, 0.999)

    def __post_init__(self) -> None:
        if self.lr < 0:
            raise ValueError(f"lr must be >= 0, got {self.lr}")


@dataclass
class Run:
    name: str = "run"
    steps: int = 10
    head: Literal["deepsurv", "deephit"] = "deepsurv"
    optim: Optim = field(default_factory=Optim)
    tags: list[str] = field(default_factory=list)
    stage1_dir: str | None = None


def test_yaml_overrides_and_round_trip(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("name: a\noptim:\n  lr: 3e-4\n  betas: [0.8, 0.9]\n")
    cfg = load_config(Run, path, ["steps=5", "optim.lr=1e-3", "tags=[x, y]"])
    assert cfg.name == "a" and cfg.steps == 5 and cfg.tags == ["x", "y"]
    assert cfg.optim.lr == pytest.approx(1e-3) and cfg.optim.betas == (0.8, 0.9)
    out = save_config(cfg, tmp_path / "out" / "config.yaml")
    assert from_dict(Run, yaml.safe_load(out.read_text())) == cfg
    assert to_dict(cfg)["optim"]["betas"] == [0.8, 0.9]


def test_unknown_key_is_named_with_its_file(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("optim:\n  learning_rate: 0.1\n")
    with pytest.raises(ConfigError, match=r"unknown key optim\.learning_rate in .*bad\.yaml"):
        load_config(Run, path)


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("steps=ten", r"steps.*expected an integer, got 'ten'"),
        ("head=cox", r"head.*expected one of \['deepsurv', 'deephit'\], got 'cox'"),
        ("optim.lr=-1", r"optim.*lr must be >= 0"),
        ("optim.betas=[0.9]", r"optim\.betas.*expected 2 values"),
        ("optim=3", r"optim.*expected a mapping"),
    ],
)
def test_bad_values_name_the_key(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(Run, None, [override])


def test_bad_override_syntax_and_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="expected key=value"):
        apply_overrides({}, ["steps"])
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(Run, tmp_path / "nope.yaml")
    (tmp_path / "list.yaml").write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="expected a YAML mapping"):
        load_config(Run, tmp_path / "list.yaml")


def test_optional_field_accepts_null_and_string():
    assert load_config(Run, None, ["stage1_dir=null"]).stage1_dir is None
    assert load_config(Run, None, ["stage1_dir=runs/s1"]).stage1_dir == "runs/s1"
