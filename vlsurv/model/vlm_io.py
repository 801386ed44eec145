"""Loading the decoder (LoRA, k-bit, checkpointing) and saving / loading the whole model without pickle.

A saved model directory holds:
- ``config.json``: the ``ModelConfig``;
- ``projector.safetensors`` and ``survival_branch.safetensors``: the two small modules' state dicts;
- ``adapter/``: the PEFT LoRA adapter (``adapter_config.json`` + ``adapter_model.safetensors``);
- the tokenizer files (with ``<image>`` and a pad token);
- ``deephit_cuts.json`` for a DeepHit model that has cuts;
- ``decoder/`` only when saved with ``merge_decoder=True`` (full merged weights; the config then points there).
The base decoder is otherwise referenced by ``decoder_path``; a relative path is resolved against the model dir.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from vlsurv.config import from_dict, to_dict

CONFIG_NAME = "config.json"
PROJECTOR_NAME = "projector.safetensors"
SURVIVAL_NAME = "survival_branch.safetensors"
ADAPTER_DIR = "adapter"
MERGED_DECODER_DIR = "decoder"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class ModelLoadError(ValueError):
    """A model directory, decoder directory or weight file that cannot be loaded as expected."""


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
            f"model.quantization={quantization!r} needs a CUDA GPU for bitsandbytes k-bit weights, and none is "
            f"available on this machine; set model.quantization=none to load full-precision weights"
        )
    from transformers import BitsAndBytesConfig

    if quantization == "4bit":
        return BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=dtype,
        )
    return BitsAndBytesConfig(load_in_8bit=True)


def prepare_tokenizer(tokenizer, image_token: str):
    """Add ``image_token`` (special) and a pad token (= EOS) when the tokenizer lacks them."""
    if image_token not in tokenizer.get_vocab():
        tokenizer.add_tokens([image_token], special_tokens=True)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def _resize_embeddings(model, vocab_size: int) -> None:
    """Grow the embeddings to ``vocab_size``; new rows are the mean of the old ones (deterministic)."""
    old = model.get_input_embeddings().weight.shape[0]
    if vocab_size <= old:
        return
    model.resize_token_embeddings(vocab_size, mean_resizing=False)
    with torch.no_grad():
        for layer in (model.get_input_embeddings(), model.get_output_embeddings()):
            if layer is not None:
                layer.weight[old:] = layer.weight[:old].mean(0, keepdim=True)


def load_language_model(config, tokenizer, adapter_dir: Path | None = None):
    """Base causal LM from ``config.decoder_path`` wrapped with LoRA (fresh, or from ``adapter_dir``)."""
    from peft import LoraConfig, PeftModel, get_peft_model, prepare_model_for_kbit_training
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
    if adapter_dir is not None:
        require_dir(adapter_dir, "LoRA adapter")
        return PeftModel.from_pretrained(base, adapter_dir, is_trainable=True)
    lora = LoraConfig(
        r=config.lora.r,
        lora_alpha=config.lora.alpha,
        lora_dropout=config.lora.dropout,
        target_modules=list(config.lora.target_modules),
        task_type="CAUSAL_LM",
    )
    return get_peft_model(base, lora)


def save_module(module: nn.Module, path: Path) -> None:
    state = {k: v.detach().contiguous().cpu() for k, v in module.state_dict().items()}
    save_file(state, str(path))


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


def save_model(model, directory: str | Path, merge_decoder: bool = False) -> Path:
    """Write ``model`` (a VisionLanguageSurvivalModel) to ``directory``; see the module docstring."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    config = copy.deepcopy(model.config)
    if merge_decoder:
        if config.quantization != "none":
            raise ModelLoadError(
                "save_pretrained(merge_decoder=True): cannot merge LoRA into k-bit weights; "
                "set model.quantization=none or save the adapter only"
            )
        merged = copy.deepcopy(model.language_model).merge_and_unload()
        merged.save_pretrained(directory / MERGED_DECODER_DIR)
        config.decoder_path = MERGED_DECODER_DIR
    else:
        # Resized embedding rows are rebuilt deterministically on load, so the adapter never stores embeddings.
        model.language_model.save_pretrained(directory / ADAPTER_DIR, save_embedding_layers=False)
    (directory / CONFIG_NAME).write_text(json.dumps(to_dict(config), indent=2))
    save_module(model.multi_modal_projector, directory / PROJECTOR_NAME)
    save_module(model.survival_branch, directory / SURVIVAL_NAME)
    model.tokenizer.save_pretrained(directory)
    if model.deephit_cuts is not None:
        model.deephit_cuts.save(directory)
    return directory


def read_config(config_cls, directory: Path):
    """The saved ``ModelConfig`` with ``decoder_path`` resolved against ``directory`` when relative."""
    path = directory / CONFIG_NAME
    if not path.is_file():
        raise ModelLoadError(
            f"{path}: model config does not exist; expected a directory from save_pretrained"
        )
    config = from_dict(config_cls, json.loads(path.read_text()), source=str(path))
    decoder = Path(config.decoder_path)
    if not decoder.is_absolute() and (directory / decoder).is_dir():
        config.decoder_path = str(directory / decoder)
    return config
