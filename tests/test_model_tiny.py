"""The tiny decoder factory and `vlsurv build-tiny`: a normal HF directory that Auto* classes load."""

from __future__ import annotations

import re

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from vlsurv.cli import main as cli_main
from vlsurv.model.tiny import TinyDecoderError, build_tiny_decoder


def test_fixture_directory_loads_with_auto_classes(tiny_decoder_dir):
    tokenizer = AutoTokenizer.from_pretrained(tiny_decoder_dir, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(tiny_decoder_dir, local_files_only=True)
    assert model.config.num_hidden_layers == 2 and model.config.hidden_size == 64
    assert model.get_input_embeddings().weight.shape[0] == len(tokenizer)
    for token in ("<image>", "<pad>", "<s>", "</s>"):
        assert token in tokenizer.all_special_tokens
    text = "A 3.2 cm mass, pleural effusion: 42%!"
    assert tokenizer.decode(tokenizer(text, add_special_tokens=False)["input_ids"]) == text
    assert list(tiny_decoder_dir.glob("*.safetensors"))


def test_same_seed_same_weights(tmp_path):
    a = build_tiny_decoder(
        tmp_path / "a", ["some text"] * 3, num_layers=1, hidden_size=32, num_heads=2, seed=3
    )
    b = build_tiny_decoder(
        tmp_path / "b", ["some text"] * 3, num_layers=1, hidden_size=32, num_heads=2, seed=3
    )
    wa = AutoModelForCausalLM.from_pretrained(a).state_dict()
    wb = AutoModelForCausalLM.from_pretrained(b).state_dict()
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_cli_builds_from_text_files(tmp_path, capsys):
    texts = tmp_path / "texts.txt"
    texts.write_text("first report line\n\nsecond report line\n")
    assert (
        cli_main(
            [
                "build-tiny",
                "--out",
                str(tmp_path / "tiny"),
                "--texts",
                str(texts),
                "--layers",
                "1",
                "--hidden",
                "32",
            ]
        )
        == 0
    )
    assert "tiny decoder written to" in capsys.readouterr().out
    assert AutoModelForCausalLM.from_pretrained(tmp_path / "tiny").config.num_hidden_layers == 1


def test_bad_arguments_are_named(tmp_path, capsys):
    with pytest.raises(TinyDecoderError, match="texts is empty"):
        build_tiny_decoder(tmp_path, ["", "  "])
    with pytest.raises(TinyDecoderError, match="hidden_size 30 is not divisible by num_heads 4"):
        build_tiny_decoder(tmp_path, ["text"], hidden_size=30)
    assert cli_main(["build-tiny", "--out", str(tmp_path), "--texts", str(tmp_path / "missing.txt")]) == 2
    assert re.search(
        r"vlsurv build-tiny: error: --texts .*missing.txt: file does not exist", capsys.readouterr().err
    )
