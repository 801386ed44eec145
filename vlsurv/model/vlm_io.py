"""Loading the decoder (LoRA, k-bit, checkpointing) and saving / loading the whole model without pickle.

A saved model directory holds:
- ``config.json``: the ``ModelConfig``;
- ``projector.safetensors`` and ``survival_branch.safetensors``: the two small modules' state dicts;
- ``adapter/``: the PEFT LoRA adapter (``adapter_config.json`` + ``adapter_model.safetensors``);
- the tokenizer files (with ``<image>`` and a pad token);
- ``deephit_cuts.json`` for a DeepHit model that has cuts;
- ``clinical_covariates.json`` for a model whose survival head reads clinical covariates;
- ``lobe_classifier.safetensors`` for a model with ``answer_guidance`` "lobe";
- ``decoder/`` only when saved with ``merge_decoder=True`` (full merged weights; the config then points
  there).
The base decoder is otherwise referenced by ``decoder_path``; a relative path is resolved against the model
dir.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import sys
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from vlsurv.config import from_dict, to_dict
from vlsurv.errors import ModelLoadError

if TYPE_CHECKING:  # the annotations only; transformers and peft load with a model
    from peft import PeftModel
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

    from vlsurv.model.model_config import ModelConfig
    from vlsurv.model.vlm import VisionLanguageSurvivalModel

ConfigT = TypeVar("ConfigT")

CONFIG_NAME = "config.json"
PROJECTOR_NAME = "projector.safetensors"
SURVIVAL_NAME = "survival_branch.safetensors"
ADAPTER_DIR = "adapter"
MERGED_DECODER_DIR = "decoder"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class KbitUnavailableError(ModelLoadError):
    """k-bit (bitsandbytes) loading asked for on a machine that cannot run it."""


def require_dir(path: Path, what: str) -> Path:
    if not path.is_dir():
        raise ModelLoadError(f"{what} {path}: directory does not exist; expected a local Hugging Face folder")
    return path


def kbit_config(quantization: str, dtype: torch.dtype):
    """BitsAndBytesConfig for ``"4bit"`` (nf4, double quant) or ``"8bit"``; raises where CUDA is missing."""
    if not torch.cuda.is_available():
        raise KbitUnavailableError(
            f"model.quantization={quantization!r} needs a CUDA GPU for bitsandbytes k-bit weights, "
            "and none is "
            f"available on this machine; set model.quantization=none to load full-precision weights"
        )
    # transformers loads with a model, not when `vlsurv predict --help` imports this module
    from transformers import BitsAndBytesConfig

    if quantization == "4bit":
        return BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=dtype,
        )
    return BitsAndBytesConfig(load_in_8bit=True)


def prepare_tokenizer(tokenizer: PreTrainedTokenizerBase, image_token: str) -> PreTrainedTokenizerBase:
    """Add ``image_token`` (special) and a pad token (= EOS) when the tokenizer lacks them."""
    if image_token not in tokenizer.get_vocab():
        tokenizer.add_tokens([image_token], special_tokens=True)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def _resize_embeddings(model: PreTrainedModel, vocab_size: int) -> None:
    """Grow the embeddings to ``vocab_size``; new rows are the mean of the old ones (deterministic)."""
    old = model.get_input_embeddings().weight.shape[0]
    if vocab_size <= old:
        return
    model.resize_token_embeddings(vocab_size, mean_resizing=False)
    with torch.no_grad():
        for layer in (model.get_input_embeddings(), model.get_output_embeddings()):
            if layer is not None:
                layer.weight[old:] = layer.weight[:old].mean(0, keepdim=True)


@contextmanager
def _peft_scope(kbit: bool) -> Iterator[None]:
    """Around peft's import and its wrapping of the decoder.

    - peft imports bitsandbytes whenever it is installed (at ``import peft`` and in LoRA's layer dispatch);
      that import compiles kernels and logs "Failed to load CPU gemm_4bit_forward" on some CPUs. Unless k-bit
      weights are asked for, a ``None`` entry in ``sys.modules`` hides it (``import`` fails, ``find_spec``
      gives None). On exit the entry goes and peft's cached availability checks are cleared, so a later k-bit
      model in the same process gets bitsandbytes.
    - ``PeftModel.__init__`` reads transformers' deprecated ``is_gradient_checkpointing``: that one
      FutureWarning is ignored here.
    """
    hide = not kbit and "bitsandbytes" not in sys.modules
    if hide:
        sys.modules["bitsandbytes"] = None
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings(
                "ignore",
                message="`is_gradient_checkpointing` is deprecated",
                category=FutureWarning,
                module="transformers.modeling_utils",
            )
            yield
    finally:
        if hide and "bitsandbytes" in sys.modules and sys.modules["bitsandbytes"] is None:
            del sys.modules["bitsandbytes"]
            peft_imports = sys.modules.get("peft.import_utils")
            if peft_imports is not None:
                peft_imports.is_bnb_available.cache_clear()
                peft_imports.is_bnb_4bit_available.cache_clear()


def load_language_model(config: ModelConfig, tokenizer: PreTrainedTokenizerBase) -> PeftModel:
    """Base causal LM from ``config.decoder_path`` wrapped with a fresh LoRA of ``config.lora``; imports
    bitsandbytes only for k-bit weights (``_peft_scope``)."""
    with _peft_scope(kbit=config.quantization != "none"):
        return _load_language_model(config, tokenizer)


def _load_language_model(config: ModelConfig, tokenizer: PreTrainedTokenizerBase) -> PeftModel:
    # imported here, inside _peft_scope, so that bitsandbytes stays hidden unless k-bit weights are asked for
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM

    path = require_dir(Path(config.decoder_path), "model.decoder_path")
    dtype = DTYPES[config.dtype]
    kwargs = {"local_files_only": True, "trust_remote_code": config.trust_remote_code, "dtype": dtype}
    if config.quantization != "none":
        kwargs["quantization_config"] = kbit_config(config.quantization, dtype)
        kwargs["device_map"] = {"": torch.cuda.current_device()}
    try:
        base = AutoModelForCausalLM.from_pretrained(path, use_safetensors=True, **kwargs)
    except OSError as err:
        raise ModelLoadError(
            f"model.decoder_path {path}: cannot load a causal LM with safetensors weights: {err}"
        ) from err
    _resize_embeddings(base, len(tokenizer))
    checkpointing = {"use_reentrant": False}
    if config.quantization != "none":
        base = prepare_model_for_kbit_training(
            base,
            use_gradient_checkpointing=config.gradient_checkpointing,
            gradient_checkpointing_kwargs=checkpointing,
        )
    elif config.gradient_checkpointing and hasattr(base, "activation_checkpointing_enable"):
        base.activation_checkpointing_enable(activation_checkpointing_kwargs=checkpointing)
    elif config.gradient_checkpointing:
        base.gradient_checkpointing_enable(gradient_checkpointing_kwargs=checkpointing)
    if config.gradient_checkpointing:
        base.config.use_cache = False
    lora = LoraConfig(
        r=config.lora.r,
        lora_alpha=config.lora.alpha,
        lora_dropout=config.lora.dropout,
        target_modules=list(config.lora.target_modules),
        task_type="CAUSAL_LM",
    )
    return get_peft_model(base, lora)


def load_adapter(language_model: PeftModel, adapter_dir: Path, kbit: bool) -> None:
    """Load the weights of a saved LoRA adapter folder into ``language_model``'s (a peft model's) own LoRA,
    kept trainable; ModelLoadError naming the folder when they do not fit it."""
    require_dir(adapter_dir, "LoRA adapter")
    try:
        with _peft_scope(kbit):
            result = language_model.load_adapter(adapter_dir, adapter_name="default", is_trainable=True)
    except (RuntimeError, ValueError) as err:
        raise ModelLoadError(
            f"LoRA adapter {adapter_dir}: its weights do not fit the model's LoRA: {err}"
        ) from err
    if result.missing_keys or result.unexpected_keys:
        raise ModelLoadError(
            f"LoRA adapter {adapter_dir}: its weights do not fit the model's LoRA (missing "
            f"{result.missing_keys[:3]}, unexpected {result.unexpected_keys[:3]}); expected the same "
            "model.lora"
        )


def save_module(module: nn.Module, path: Path, state: dict[str, torch.Tensor] | None = None) -> None:
    """``module``'s weights (or ``state``, the same keys gathered elsewhere) as safetensors."""
    state = module.state_dict() if state is None else state
    save_file({k: v.detach().contiguous().cpu() for k, v in state.items()}, str(path))


def part_of(state: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """The entries of a whole-model state dict under ``prefix`` (e.g. "survival_branch."), prefix removed."""
    return {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}


def load_module(module: nn.Module, path: Path) -> None:
    """Load a safetensors state dict into ``module`` strictly; names the file on mismatch."""
    if not path.is_file():
        raise ModelLoadError(f"{path}: weight file does not exist")
    state = load_file(str(path))
    expected = module.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong = sorted(k for k in set(state) & set(expected) if state[k].shape != expected[k].shape)
    if missing or unexpected or wrong:
        raise ModelLoadError(
            f"{path}: weights do not fit the module (missing {missing[:3]}, unexpected {unexpected[:3]}, "
            f"wrong shape {[(k, tuple(state[k].shape), tuple(expected[k].shape)) for k in wrong[:3]]})"
        )
    module.load_state_dict(state)


def save_model(
    model: VisionLanguageSurvivalModel,
    directory: str | Path,
    merge_decoder: bool = False,
    state_dict: dict[str, torch.Tensor] | None = None,
) -> Path:
    """Write ``model`` (a VisionLanguageSurvivalModel) to ``directory``; see the module docstring.

    ``state_dict``: the model's full state dict gathered by the caller (``accelerator.get_state_dict`` under
    FSDP / ZeRO-3, where the module's own parameters are shards); written instead of the module's parameters.
    """
    directory = Path(directory)
    if state_dict is not None and merge_decoder:
        raise ModelLoadError(
            "save_pretrained: merge_decoder=True takes the module's own weights; give no state_dict"
        )
    directory.mkdir(parents=True, exist_ok=True)
    config = model.config
    if merge_decoder:
        if config.quantization != "none":
            raise ModelLoadError(
                "save_pretrained(merge_decoder=True): cannot merge LoRA into k-bit weights; "
                "set model.quantization=none or save the adapter only"
            )
        merged = copy.deepcopy(model.language_model).merge_and_unload()
        merged.save_pretrained(directory / MERGED_DECODER_DIR)
        config = dataclasses.replace(config, decoder_path=MERGED_DECODER_DIR)
    else:
        # Resized embedding rows are rebuilt deterministically on load, so the adapter never stores
        # embeddings.
        gathered = {} if state_dict is None else {"state_dict": part_of(state_dict, "language_model.")}
        model.language_model.save_pretrained(directory / ADAPTER_DIR, save_embedding_layers=False, **gathered)
    (directory / CONFIG_NAME).write_text(json.dumps(to_dict(config), indent=2))
    for module, name, prefix in (
        (model.multi_modal_projector, PROJECTOR_NAME, "multi_modal_projector."),
        (model.survival_branch, SURVIVAL_NAME, "survival_branch."),
    ):
        save_module(module, directory / name, None if state_dict is None else part_of(state_dict, prefix))
    model.tokenizer.save_pretrained(directory)
    if model.deephit_cuts is not None:
        model.deephit_cuts.save(directory)
    if model.clinical_covariates is not None:
        model.clinical_covariates.save(directory)
    if model.lobe_classifier is not None:
        model.lobe_classifier.save(directory)
    return directory


def read_config(config_cls: type[ConfigT], directory: Path) -> ConfigT:
    """The saved ``ModelConfig`` with ``decoder_path`` resolved against ``directory`` when relative."""
    path = directory / CONFIG_NAME
    if not path.is_file():
        raise ModelLoadError(
            f"{path}: model config does not exist; expected a directory from save_pretrained"
        )
    config = from_dict(config_cls, json.loads(path.read_text()), source=str(path))
    decoder = Path(config.decoder_path)
    if not decoder.is_absolute() and (directory / decoder).is_dir():
        return dataclasses.replace(config, decoder_path=str(directory / decoder))
    return config
