"""The tiny decoder factory and `vlsurv build-tiny`: a normal HF directory that Auto* classes load."""

from __future__ import annotations

import json
import re

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from vlsurv.cli import main as cli_main
from vlsurv.model.tiny import TinyDecoderError, build_tiny_decoder, cohort_texts


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


@pytest.fixture(scope="module")
def small_cohort(tmp_path_factory):
    """(manifest, vqa) of a 12-patient synthetic cohort with one VQA row per (scan, question)."""
    import pandas as pd

    from vlsurv.data.synthetic import make_cohort

    out = tmp_path_factory.mktemp("cohort")
    manifest = make_cohort(12, 0, out, shape=(16, 16, 8))
    scans = pd.read_csv(manifest, dtype={"scan_id": str})["scan_id"]
    vqa = out / "vqa.jsonl"
    vqa.write_text(
        "".join(
            json.dumps({"scan_id": s, "question_id": q, "question": f"{q}?", "answer": f"{q} of {s}"}) + "\n"
            for s in scans
            for q in ("tumor", "pleura")
        )
    )
    return manifest, vqa


def test_cohort_texts_hold_only_the_train_splits_answers_and_reports(small_cohort):
    import pandas as pd

    from vlsurv.data.clinical import clinical_sentence

    manifest, vqa = small_cohort
    table = pd.read_csv(manifest, dtype={"scan_id": str})
    train = table[table["split"] == "train"]
    assert 0 < len(train) < len(table)
    texts = cohort_texts(manifest, vqa)
    answers = [f"{q}? {q} of {s}" for s in train["scan_id"] for q in ("tumor", "pleura")]
    sentences = [clinical_sentence(row) for row in table.to_dict("records")]
    assert texts == answers + sentences + train["report"].tolist()
    held_out = table[table["split"] != "train"]
    assert not any(f"of {s}" in text for s in held_out["scan_id"] for text in texts)
    assert cohort_texts(manifest) == sentences + train["report"].tolist()


def test_cohort_texts_give_the_answers_in_stage_1s_answer_format(small_cohort, tmp_path):
    """With a status format, the decoder learns the answers as stage 1 will train on them, openings included,
    so that it has read the opening's lobe repeated in the sentence after it."""
    import pandas as pd

    manifest, _ = small_cohort
    scan = pd.read_csv(manifest, dtype={"scan_id": str}).query("split == 'train'")["scan_id"].iloc[0]
    answers = {
        "tumor": "A 31 mm spiculated mass in the left lower lobe.",
        "pleura": "No pleural effusion.",
        "bone": "No lytic or blastic osseous lesions.",
    }
    vqa = tmp_path / "vqa.jsonl"
    vqa.write_text(
        "".join(
            json.dumps({"scan_id": scan, "question_id": q, "question": f"{q}?", "answer": a}) + "\n"
            for q, a in answers.items()
        )
    )
    plain = cohort_texts(manifest, vqa)[:3]
    assert plain == [f"{q}? {a}" for q, a in answers.items()]
    assert cohort_texts(manifest, vqa, answer_format="status_first")[:2] == [
        "tumor? Present: A 31 mm spiculated mass in the left lower lobe.",
        "pleura? Absent: No pleural effusion.",
    ]
    assert cohort_texts(manifest, vqa, answer_format="findings_first")[:3] == [
        "tumor? Present, tumor, left lower lobe: A 31 mm spiculated mass in the left lower lobe.",
        "pleura? Absent, pleura: No pleural effusion.",
        "bone? Absent, bone: No lytic or blastic osseous lesions.",
    ]
    with pytest.raises(TinyDecoderError, match=r"answer format 'yes_no': expected one of \('as_extracted', "):
        cohort_texts(manifest, vqa, answer_format="yes_no")


def test_cli_builds_from_a_manifest_and_a_vqa_file(small_cohort, tmp_path, capsys):
    manifest, vqa = small_cohort
    argv = ["build-tiny", "--out", str(tmp_path / "tiny"), "--manifest", str(manifest), "--vqa", str(vqa)]
    assert cli_main([*argv, "--layers", "1", "--hidden", "32"]) == 0
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "tiny")
    assert "tiny decoder written to" in capsys.readouterr().out
    # BPE learnt the reports' words: a common phrase is a few tokens, not one per byte
    assert len(tokenizer.tokenize("pleural effusion")) <= 4


def test_cli_names_a_missing_text_source_and_a_manifest_without_training_rows(small_cohort, tmp_path, capsys):
    import pandas as pd

    manifest, vqa = small_cohort
    for argv, expected in (
        ([], "expected text to learn from: --texts FILE [FILE ...] and/or --manifest MANIFEST"),
        (["--vqa", str(vqa)], "--vqa needs --manifest"),
    ):
        with pytest.raises(SystemExit) as exit_:
            cli_main(["build-tiny", "--out", str(tmp_path / "tiny"), *argv])
        assert exit_.value.code == 2 and expected in capsys.readouterr().err
    table = pd.read_csv(manifest)
    table["split"] = "test"
    no_train = tmp_path / "no_train.csv"
    table.assign(image=[str(manifest.parent / i) for i in table["image"]]).to_csv(no_train, index=False)
    assert cli_main(["build-tiny", "--out", str(tmp_path / "tiny"), "--manifest", str(no_train)]) == 2
    assert (
        f"vlsurv build-tiny: error: --manifest {no_train}: no row has split 'train'; expected training scans"
        in capsys.readouterr().err
    )
