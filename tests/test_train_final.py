"""The final save under sharded training: the full state dict is gathered on every process (FSDP / ZeRO-3
all-gather there) and only the main process writes it.

accelerate 1.16 turns on FSDP only for GPU-like process types (its AcceleratorState switches to
DistributedType.FSDP for MULTI_GPU / NPU / XPU / ..., not for MULTI_CPU), and its FSDP plugin refuses
``sync_module_states`` on CPU, so no gloo run on CPU can train with FSDP here. These tests drive
``Trainer.finish`` with a recording accelerator that plays one rank at a time.
"""

from __future__ import annotations

import json
from types import SimpleNamespace

import torch
from safetensors.torch import load_file

from vlsurv.model import VisionLanguageSurvivalModel
from vlsurv.training.checkpoints import CheckpointManager
from vlsurv.training.config import TrainConfig
from vlsurv.training.loop import Trainer


class RecordingAccelerator:
    """Plays one rank: ``get_state_dict`` returns the model's state with the survival head's bias shifted by 1
    (what a gather would return that differs from the local module), and every call is recorded."""

    def __init__(self, is_main_process: bool) -> None:
        self.is_main_process = is_main_process
        self.calls: list[str] = []

    def get_state_dict(self, model):
        self.calls.append("get_state_dict")
        state = {key: value.clone() for key, value in model.state_dict().items()}
        state["survival_branch.head.bias"] += 1.0
        return state

    def unwrap_model(self, model):
        return model

    def wait_for_everyone(self) -> None:
        self.calls.append("wait_for_everyone")

    def load_state(self, *args, **kwargs) -> None:
        self.calls.append("load_state")

    def print(self, *args, **kwargs) -> None:
        pass

    def end_training(self) -> None:
        self.calls.append("end_training")


def _trainer(model, accelerator, run_dir) -> Trainer:
    trainer = Trainer.__new__(Trainer)
    trainer.config = TrainConfig(tracker="none", output_dir=str(run_dir))
    trainer.config.checkpoint.keep_best = False
    trainer.accelerator, trainer.model, trainer.run_dir = accelerator, model, run_dir
    trainer.checkpoints = CheckpointManager(run_dir / "checkpoints", 1, False, False)
    trainer.step, trainer.last_validation = 3, (3, 1.25)
    trainer.image_encoder = None  # a cache without encoder records
    trainer.data = SimpleNamespace(train=SimpleNamespace(processor=model.processor))
    return trainer


def test_every_rank_gathers_and_only_the_main_rank_writes(tiny_model_config, tmp_path):
    torch.manual_seed(0)
    model = VisionLanguageSurvivalModel(tiny_model_config)
    other = RecordingAccelerator(is_main_process=False)
    _trainer(model, other, tmp_path / "rank1").finish()
    assert "get_state_dict" in other.calls and not (tmp_path / "rank1" / "final").exists()
    assert other.calls.index("get_state_dict") < len(other.calls) - 1 - other.calls[::-1].index(
        "wait_for_everyone"
    )

    main = RecordingAccelerator(is_main_process=True)
    final = _trainer(model, main, tmp_path / "rank0").finish()
    assert main.calls.count("get_state_dict") == 1 and "load_state" not in main.calls
    saved = load_file(str(final / "survival_branch.safetensors"))
    torch.testing.assert_close(saved["head.bias"], model.survival_branch.head.bias.detach() + 1.0)
    torch.testing.assert_close(saved["head.weight"], model.survival_branch.head.weight.detach())
    selection = json.loads((final / "selection.json").read_text())
    assert selection == {
        "selected": "last",
        "step": 3,
        "metric": "val/lm_loss",
        "value": 1.25,
        "last_step": 3,
        "scoring": {"pool": "all", "generate": True, "max_new_tokens": 32, "do_sample": False},
    }
    reloaded = VisionLanguageSurvivalModel.from_pretrained(final)
    torch.testing.assert_close(
        reloaded.survival_branch.head.bias, model.survival_branch.head.bias.detach() + 1.0
    )


def test_checkpoint_hook_keeps_trainable_weights_of_a_ddp_wrapped_model():
    from torch import nn

    from vlsurv.training.checkpoints import keep_changing_weights

    inner = nn.ModuleDict({"lora_A": nn.Linear(2, 2), "base": nn.Linear(2, 2)})
    inner["base"].requires_grad_(False)
    wrapped = nn.Module()
    wrapped.module = inner  # what DistributedDataParallel's parameter names look like: "module.<name>"
    state = dict(inner.state_dict())
    keep_changing_weights(wrapped)([wrapped], [state], "unused")
    assert sorted(state) == ["lora_A.bias", "lora_A.weight"]
