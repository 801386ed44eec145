"""Bad input through the public CLI: one line ``<prog> <command>: error: <message>``, a non-zero exit, no
traceback.

Each case builds one bad file or option in a temporary folder next to a small valid synthetic cohort, runs
``vlsurv.cli.main`` or ``qa_extraction.__main__.main`` in-process, and checks that the message names the
file, row or field. An exception escaping ``main`` is what a user would see as a traceback.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import pytest
import torch
import yaml

from qa_extraction.__main__ import main as qa_main
from qa_extraction.io import ExtractionInputError
from vlsurv.cli import main as vlsurv_main
from vlsurv.data.manifest import ManifestError

ROOT = Path(__file__).resolve().parents[1]
QA_REPORTS = ROOT / "tests" / "fixtures" / "qa" / "reports.csv"
CTRATE = ROOT / "tests" / "fixtures" / "ctrate"


@pytest.fixture(scope="module")
def cohort(tmp_path_factory) -> Path:
    """The manifest of a 12-patient synthetic cohort with 16 x 16 x 8 volumes."""
    out = tmp_path_factory.mktemp("cohort")
    assert vlsurv_main(["synth", "--n", "12", "--out", str(out), "--shape", "16", "16", "8"]) == 0
    return out / "manifest.csv"


def _manifest(cohort: Path, tmp: Path, edit: Callable[[pd.DataFrame], pd.DataFrame], name="bad.csv") -> Path:
    table = edit(pd.read_csv(cohort, dtype=str, keep_default_na=False))
    table["image"] = [str(cohort.parent / image) for image in table["image"]]
    path = tmp / name
    table.to_csv(path, index=False)
    return path


def _with(column: str, row: int, value: str):
    def edit(table: pd.DataFrame) -> pd.DataFrame:
        table.loc[row, column] = value
        return table

    return edit


def _yaml(tmp: Path, name: str, data) -> Path:
    path = tmp / name
    path.write_text(yaml.safe_dump(data))
    return path


def _tiny_encoder_state() -> dict[str, torch.Tensor]:
    from vlsurv.encoders.cache import build_encoder

    return build_encoder("tiny").state_dict()


class CodeInPickle:
    """Unpickling this calls ``open(marker, "w")``: a pickle that carries code."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def _encode(manifest: Path, tmp: Path, *extra: str) -> list[str]:
    return [
        "encode",
        "--manifest",
        str(manifest),
        "--out",
        str(tmp / "cache"),
        "--encoder",
        "tiny",
        "--device",
        "cpu",
        *extra,
    ]


def _predictions(tmp: Path, cohort: Path, risk: list[str] | None = None, columns=("scan_id", "risk")) -> Path:
    scans = pd.read_csv(cohort, dtype=str).scan_id
    table = pd.DataFrame({"scan_id": scans, "risk": risk or [str(i / 10) for i in range(len(scans))]})
    path = tmp / "predictions.csv"
    table[list(columns)].to_csv(path, index=False)
    return path


def _evaluate(predictions: Path, manifest: Path, tmp: Path, *extra: str) -> list[str]:
    return [
        "evaluate",
        "--predictions",
        str(predictions),
        "--manifest",
        str(manifest),
        "--out",
        str(tmp / "ev"),
        "--bootstrap",
        "10",
        *extra,
    ]


def _stage1_config(tmp: Path, cohort: Path, **model) -> dict:
    return {
        "stage": 1,
        "data": {"manifest": str(cohort), "vqa": str(tmp / "vqa.jsonl"), "cache": str(tmp / "c")},
        "model": {"decoder_path": str(tmp / "no_decoder"), **model},
        "output_dir": str(tmp / "run"),
    }


def _extractions(tmp: Path, text: str) -> Path:
    path = tmp / "extractions.jsonl"
    path.write_text(text)
    return path


def _extract(tmp: Path, reports: Path = QA_REPORTS, *extra: str, questions: str = "lung") -> list[str]:
    return [
        "extract",
        "--reports",
        str(reports),
        "--id-column",
        "report_id",
        "--text-column",
        "findings",
        "--questions",
        questions,
        "--backend",
        "rules",
        "--out",
        str(tmp / "out.jsonl"),
        *extra,
    ]


@dataclass
class Case:
    """A bad input: ``build(tmp, cohort) -> argv``; the message must contain every string of ``names``."""

    build: Callable[[Path, Path], list[str]]
    names: tuple[str, ...]
    qa: bool = False


def _torn_jsonl(tmp: Path, cohort: Path) -> Path:
    table = pd.read_csv(cohort, dtype=str)
    table["image"] = [str(cohort.parent / image) for image in table["image"]]
    lines = [json.dumps(row) for row in table.to_dict("records")]
    path = tmp / "torn.jsonl"
    path.write_text("\n".join(lines[:-1]) + "\n" + lines[-1][: len(lines[-1]) // 2])
    return path


def _checkpoint(tmp: Path, edit: Callable[[dict], dict]) -> Path:
    path = tmp / "encoder.pt"
    torch.save(edit(_tiny_encoder_state()), path)
    return path


def _drop_last_key(state: dict) -> dict:
    state.pop(list(state)[-1])
    return state


def _widen_first_weight(state: dict) -> dict:
    key = next(k for k, v in state.items() if v.ndim > 1)
    state[key] = torch.zeros(*state[key].shape[:-1], state[key].shape[-1] + 1)
    return state


CASES: dict[str, Case] = {
    "manifest_not_found": Case(lambda t, c: _encode(t / "nope.csv", t), ("nope.csv", "not found")),
    "manifest_missing_column": Case(
        lambda t, c: _encode(_manifest(c, t, lambda df: df.drop(columns="split")), t), ("bad.csv", "split")
    ),
    "manifest_unknown_split": Case(
        lambda t, c: _encode(_manifest(c, t, _with("split", 2, "dev")), t),
        ("bad.csv", "row 3", "split", "dev"),
    ),
    "manifest_empty_file": Case(lambda t, c: _encode(_text_file(t, "empty.csv", ""), t), ("empty.csv",)),
    "manifest_header_only": Case(
        lambda t, c: _encode(_manifest(c, t, lambda df: df.iloc[:0]), t), ("bad.csv",)
    ),
    "manifest_torn_jsonl_line": Case(lambda t, c: _encode(_torn_jsonl(t, c), t), ("torn.jsonl",)),
    "manifest_image_not_found": Case(
        lambda t, c: _encode(_manifest(c, t, _with("image", 0, "missing.nii.gz")), t),
        ("bad.csv", "row 1", "image", "missing.nii.gz"),
    ),
    "manifest_duplicate_scan_id": Case(
        lambda t, c: _encode(_manifest(c, t, _with("scan_id", 1, "syn00000_ct")), t),
        ("bad.csv", "row 2", "scan_id", "duplicate"),
    ),
    "manifest_nan_time": Case(
        lambda t, c: _evaluate(_predictions(t, c), _manifest(c, t, _with("time", 4, "nan")), t),
        ("bad.csv", "row 5", "time"),
    ),
    "manifest_negative_time": Case(
        lambda t, c: _evaluate(_predictions(t, c), _manifest(c, t, _with("time", 0, "-3")), t),
        ("bad.csv", "row 1", "time", "-3"),
    ),
    "manifest_event_not_binary": Case(
        lambda t, c: _evaluate(_predictions(t, c), _manifest(c, t, _with("event", 1, "2")), t),
        ("bad.csv", "row 2", "event"),
    ),
    "checkpoint_pickle_with_code": Case(
        lambda t, c: _encode(c, t, "--checkpoint", str(_code_pickle(t))), ("evil.pt",)
    ),
    "checkpoint_missing_keys": Case(
        lambda t, c: _encode(c, t, "--checkpoint", str(_checkpoint(t, _drop_last_key))),
        ("encoder.pt", "missing"),
    ),
    "checkpoint_wrong_shape": Case(
        lambda t, c: _encode(c, t, "--checkpoint", str(_checkpoint(t, _widen_first_weight))),
        ("encoder.pt", "wrong shape"),
    ),
    "checkpoint_not_found": Case(
        lambda t, c: _encode(c, t, "--checkpoint", str(t / "merlin.pt")), ("merlin.pt", "does not exist")
    ),
    "checkpoint_not_a_state_dict": Case(
        lambda t, c: _encode(c, t, "--checkpoint", str(_text_file(t, "merlin.safetensors", "not tensors"))),
        ("merlin.safetensors",),
    ),
    "encoder_config_unknown_key": Case(
        lambda t, c: [
            "encode",
            "--manifest",
            str(c),
            "--out",
            str(t / "cache"),
            "--encoder-config",
            str(_yaml(t, "enc.yaml", {"layers": [1, 1, 1, 1], "depth": 3})),
        ],
        ("enc.yaml", "depth"),
    ),
    "encoder_config_bad_value": Case(
        lambda t, c: [
            "encode",
            "--manifest",
            str(c),
            "--out",
            str(t / "cache"),
            "--encoder-config",
            str(_yaml(t, "enc.yaml", {"layers": [0, 1, 1, 1]})),
        ],
        ("enc.yaml", "layers"),
    ),
    "preprocess_config_not_yaml": Case(
        lambda t, c: _encode(
            c, t, "--preprocess-config", str(_text_file(t, "pre.yaml", "spacing: [1, 2\nx: ]"))
        ),
        ("pre.yaml",),
    ),
    "cache_out_is_a_file": Case(
        lambda t, c: [
            "encode",
            "--manifest",
            str(c),
            "--out",
            str(_text_file(t, "cache", "x")),
            "--encoder",
            "tiny",
            "--device",
            "cpu",
        ],
        ("cache",),
    ),
    "train_config_not_found": Case(
        lambda t, c: ["train", "--config", str(t / "stage9.yaml")], ("stage9.yaml",)
    ),
    "train_config_unknown_key": Case(
        lambda t, c: [
            "train",
            "--config",
            str(_yaml(t, "s1.yaml", {**_stage1_config(t, c), "optimiser": {}})),
        ],
        ("s1.yaml", "optimiser"),
    ),
    "train_config_bad_value": Case(
        lambda t, c: [
            "train",
            "--config",
            str(_yaml(t, "s1.yaml", _stage1_config(t, c))),
            "optim.epochs=many",
        ],
        ("optim.epochs", "many"),
    ),
    "train_decoder_folder_missing": Case(
        lambda t, c: ["train", "--config", str(_yaml(t, "s1.yaml", _stage1_config(t, c)))], ("no_decoder",)
    ),
    "train_config_not_yaml": Case(
        lambda t, c: ["train", "--config", str(_text_file(t, "s1.yaml", "stage: 1\noptim: {lr: [1e-4\n"))],
        ("s1.yaml", "not valid YAML"),
    ),
    "train_override_not_key_value": Case(
        lambda t, c: ["train", "--config", str(_yaml(t, "s1.yaml", _stage1_config(t, c))), "optim.epochs"],
        ("optim.epochs", "key=value"),
    ),
    "predict_model_folder_missing": Case(
        lambda t, c: [
            "predict",
            "--model",
            str(t / "no_model"),
            "--manifest",
            str(c),
            "--cache",
            str(t / "cache"),
            "--out",
            str(t / "pred"),
            "--device",
            "cpu",
        ],
        ("no_model",),
    ),
    "predict_bad_option": Case(
        lambda t, c: [
            "predict",
            "--model",
            str(t),
            "--manifest",
            str(c),
            "--cache",
            str(t),
            "--out",
            str(t),
            "--batch-scans",
            "0",
        ],
        ("batch_scans",),
    ),
    "predictions_not_found": Case(lambda t, c: _evaluate(t / "no_run", c, t), ("no_run",)),
    "predictions_missing_column": Case(
        lambda t, c: _evaluate(_predictions(t, c, columns=("scan_id",)), c, t), ("predictions.csv", "risk")
    ),
    "predictions_not_finite": Case(
        lambda t, c: _evaluate(_predictions(t, c, risk=["inf"] * 12), c, t), ("predictions.csv", "risk")
    ),
    "evaluate_horizon_after_follow_up": Case(
        lambda t, c: _evaluate(_predictions(t, c), c, t, "--horizons", "1e9"), ("1e+09",)
    ),
    "horizon_without_negatives": Case(
        lambda t, c: ["horizon", "--manifest", str(c), "--out", str(t / "h"), "--horizons", "1e9"],
        ("manifest.csv", "train split", "horizon 1e+09 has no negatives"),
    ),
    "horizon_compare_column_missing": Case(
        lambda t, c: [
            "horizon",
            "--manifest",
            str(c),
            "--out",
            str(t / "h"),
            "--horizons",
            "1",
            "--eval-split",
            "all",
            "--compare",
            f"vlm:risk_tumor={_text_file(t, 'p.csv', 'scan_id,risk' + chr(10))}",
        ],
        ("p.csv", "risk_tumor"),
    ),
    "synth_too_few_patients": Case(lambda t, c: ["synth", "--n", "0", "--out", str(t / "s")], ("n",)),
    "synth_out_is_a_file": Case(
        lambda t, c: ["synth", "--n", "3", "--out", str(_text_file(t, "s", "x")), "--shape", "8", "8", "4"],
        ("s",),
    ),
    "ctrate_volumes_missing": Case(
        lambda t, c: [
            "ctrate",
            "--volumes",
            str(t / "no_volumes"),
            "--metadata",
            str(CTRATE / "validation_metadata.csv"),
            "--reports",
            str(CTRATE / "reports.csv"),
            "--out",
            str(t / "ct"),
        ],
        ("no_volumes",),
    ),
    "ctrate_metadata_missing_column": Case(
        lambda t, c: [
            "ctrate",
            "--volumes",
            str(t),
            "--metadata",
            str(_text_file(t, "meta.csv", "VolumeName\na\n")),
            "--reports",
            str(CTRATE / "reports.csv"),
            "--out",
            str(t / "ct"),
        ],
        ("meta.csv",),
    ),
    "inspect_root_missing": Case(
        lambda t, c: ["inspect", "--root", str(t / "no_inspect"), "--out", str(t / "m.csv")], ("no_inspect",)
    ),
    "inspect_no_labels": Case(
        lambda t, c: ["inspect", "--root", str(t), "--out", str(t / "m.csv")], ("labels",)
    ),
    "extract_reports_not_found": Case(lambda t, c: _extract(t, t / "reports.csv"), ("reports.csv",), qa=True),
    "extract_id_column_missing": Case(
        lambda t, c: _extract(t, _text_file(t, "r.csv", "id,report\n1,No effusion.\n")),
        ("r.csv", "report_id"),
        qa=True,
    ),
    "extract_questions_not_found": Case(lambda t, c: _extract(t, questions="kidney"), ("kidney",), qa=True),
    "extract_question_without_text": Case(
        lambda t, c: _extract(t, questions=str(_yaml(t, "q.yaml", {"questions": [{"id": "tumor"}]}))),
        ("q.yaml", "text"),
        qa=True,
    ),
    "extract_out_is_a_folder": Case(
        lambda t, c: [
            "extract",
            "--reports",
            str(QA_REPORTS),
            "--id-column",
            "report_id",
            "--text-column",
            "findings",
            "--backend",
            "rules",
            "--out",
            str(_folder(t, "out.jsonl")),
        ],
        ("out.jsonl",),
        qa=True,
    ),
    "vqa_extractions_not_json": Case(
        lambda t, c: [
            "to-vqa",
            "--extractions",
            str(_extractions(t, "report_id,answer\n1,yes\n")),
            "--manifest",
            str(c),
            "--out",
            str(t / "vqa.jsonl"),
        ],
        ("extractions.jsonl", "line 1"),
        qa=True,
    ),
    "vqa_extractions_torn_line": Case(
        lambda t, c: [
            "to-vqa",
            "--extractions",
            str(_extractions(t, '{"report_id": "a", "ques')),
            "--manifest",
            str(c),
            "--out",
            str(t / "vqa.jsonl"),
        ],
        ("extractions.jsonl",),
        qa=True,
    ),
    "vqa_manifest_not_found": Case(
        lambda t, c: [
            "to-vqa",
            "--extractions",
            str(_extractions(t, "")),
            "--manifest",
            str(t / "m.csv"),
            "--out",
            str(t / "vqa.jsonl"),
        ],
        ("m.csv",),
        qa=True,
    ),
}


def _text_file(tmp: Path, name: str, text: str) -> Path:
    path = tmp / name
    path.write_text(text)
    return path


def _folder(tmp: Path, name: str) -> Path:
    path = tmp / name
    path.mkdir()
    return path


def _code_pickle(tmp: Path) -> Path:
    path = tmp / "evil.pt"
    torch.save({"state_dict": CodeInPickle(tmp / "marker")}, path)
    return path


def run_case(case: Case, tmp: Path, cohort: Path) -> tuple[int, str]:
    """Status and stderr of the case's command; an exception escaping ``main`` propagates."""
    main = qa_main if case.qa else vlsurv_main
    try:
        return main(case.build(tmp, cohort)), ""
    except SystemExit as exit_:
        return int(exit_.code or 0), ""


@pytest.mark.parametrize("name", sorted(CASES))
def test_bad_input_is_one_line_naming_what_is_wrong(name, tmp_path, cohort, capsys, monkeypatch):
    monkeypatch.delenv("VLSURV_DEBUG", raising=False)
    case = CASES[name]
    status, _ = run_case(case, tmp_path, cohort)
    err = capsys.readouterr().err
    assert status == 2, err
    assert "Traceback" not in err
    prog = "python -m qa_extraction" if case.qa else "vlsurv"
    error_lines = [line for line in err.splitlines() if ": error: " in line]
    assert len(error_lines) == 1 and error_lines[0].startswith(f"{prog} "), err
    for expected in case.names:
        assert expected in error_lines[0], (expected, err)
    assert not (tmp_path / "marker").exists(), "the pickle's code ran"


def test_debug_flag_and_env_let_the_traceback_through(tmp_path, monkeypatch):
    argv = [
        "encode",
        "--manifest",
        str(tmp_path / "nope.csv"),
        "--out",
        str(tmp_path / "cache"),
        "--encoder",
        "tiny",
    ]
    with pytest.raises(ManifestError, match="nope.csv: manifest file not found"):
        vlsurv_main(["--debug", *argv])
    monkeypatch.setenv("VLSURV_DEBUG", "1")
    with pytest.raises(ManifestError, match="nope.csv"):
        vlsurv_main(argv)
    with pytest.raises(ExtractionInputError, match="reports.csv: file not found"):
        qa_main(_extract(tmp_path, tmp_path / "reports.csv"))


def test_unexpected_errors_keep_their_traceback(monkeypatch):
    """Only bad input becomes one line: a bug (here a RuntimeError, an OSError without a path) propagates."""
    commands = {"boom": (f"{__name__}:_raise_bug", "raises argv[0]")}
    monkeypatch.setattr("vlsurv.cli.COMMANDS", commands)
    monkeypatch.delenv("VLSURV_DEBUG", raising=False)
    with pytest.raises(RuntimeError, match="a bug"):
        vlsurv_main(["boom", "runtime"])
    with pytest.raises(OSError, match="disk"):
        vlsurv_main(["boom", "os"])


def _raise_bug(argv: list[str]) -> int:
    raise RuntimeError("a bug") if argv[0] == "runtime" else OSError(28, "no space left on disk")


def test_console_script_prints_one_line_and_debug_prints_the_traceback(tmp_path):
    script = Path(sys.executable).with_name("vlsurv")
    argv = [
        "encode",
        "--manifest",
        str(tmp_path / "nope.csv"),
        "--out",
        str(tmp_path / "cache"),
        "--encoder",
        "tiny",
    ]
    env = {k: v for k, v in os.environ.items() if k != "VLSURV_DEBUG"}
    plain = subprocess.run([str(script), *argv], capture_output=True, text=True, env=env, timeout=120)
    assert plain.returncode == 2
    assert plain.stderr.strip().splitlines() == [
        f"vlsurv encode: error: {tmp_path / 'nope.csv'}: manifest file not found"
    ]
    debug = subprocess.run(
        [str(script), "--debug", *argv], capture_output=True, text=True, env=env, timeout=120
    )
    assert debug.returncode == 1
    assert "Traceback (most recent call last)" in debug.stderr
    assert "ManifestError: " in debug.stderr and "nope.csv" in debug.stderr
