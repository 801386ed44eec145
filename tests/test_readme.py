"""The README's commands run as written.

- The walkthrough block (between ``<!-- walkthrough:start -->`` and ``<!-- walkthrough:end -->`` in README.md)
  runs with bash in a fresh folder that holds copies of the repository's configs/, scripts/ and prompts/ and a
  ``.venv`` that is this interpreter's environment, as a fresh clone's root has after ``make``. No command
  may fail or print a traceback, and the tiny configs must read exactly what the block wrote.
- Every ``vlsurv`` and ``python -m qa_extraction`` subcommand (the tables read at test time) prints its
  ``--help`` as a console command.
- Every option of the full-run block (between ``<!-- full-run:start -->`` and ``<!-- full-run:end -->``) is in
  its command's ``--help``, with a listed choice where the help lists choices; every ``key=value`` is a valid
  override of the config it is given to; every shipped file it names exists.
"""

from __future__ import annotations

import functools
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest

from qa_extraction.__main__ import COMMANDS as QA_COMMANDS
from vlsurv.cli import COMMANDS as VLSURV_COMMANDS

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
CLONE_FOLDERS = ("configs", "scripts", "prompts")
TINY_CONFIGS = ("stage1", "stage2_deepsurv", "stage2_deephit")
SHIPPED_FILE_OPTIONS = ("--config", "--config_file", "--questions", "--preprocess-config")


def _env() -> dict[str, str]:
    """This virtualenv's commands first on PATH, no debug tracebacks, nothing fetched from the Hub."""
    env = {key: value for key, value in os.environ.items() if key != "VLSURV_DEBUG"}
    return {**env, "PATH": f"{BIN}{os.pathsep}{env.get('PATH', '')}", "HF_HUB_OFFLINE": "1"}


def readme_block(name: str) -> str:
    """The fenced bash block between ``<!-- name:start -->`` and ``<!-- name:end -->`` of README.md."""
    text = (ROOT / "README.md").read_text()
    match = re.search(rf"<!-- {name}:start -->\s*```bash\n(.*?)```\s*<!-- {name}:end -->", text, re.S)
    assert match, f"README.md: no ```bash block between <!-- {name}:start --> and <!-- {name}:end -->"
    return match.group(1)


def block_commands(block: str) -> list[list[str]]:
    """The block's commands as argv lists: continuation lines joined, comments and blank lines dropped."""
    joined = re.sub(r"\\\n", " ", block)
    return [argv for line in joined.splitlines() if (argv := shlex.split(line, comments=True))]


@functools.cache
def help_text(*command: str) -> str:
    """``command --help`` run as a console command; it must exit 0 without a traceback."""
    result = subprocess.run(
        [*command, "--help"], env=_env(), capture_output=True, text=True, timeout=300, cwd=ROOT
    )
    assert result.returncode == 0 and "Traceback" not in result.stderr, (command, result.stderr)
    return result.stdout


def test_the_accelerate_entry_point_reports_bad_input_in_one_line(tmp_path):
    """scripts/train.py (what `accelerate launch` runs) ends bad input as `vlsurv train` does."""
    config = ROOT / "configs" / "tiny" / "stage1.yaml"
    result = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "train.py"), "--config", str(config)],
        cwd=tmp_path,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines() == [
        "vlsurv train: error: model.decoder_path runs/tiny/decoder: directory does not exist; expected a "
        "local Hugging Face folder"
    ]


# --- --help of every subcommand ---------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(VLSURV_COMMANDS))
def test_every_vlsurv_subcommand_prints_its_help(name):
    assert f"usage: vlsurv {name}" in help_text("vlsurv", name)


@pytest.mark.parametrize("name", sorted(QA_COMMANDS))
def test_every_qa_extraction_subcommand_prints_its_help(name):
    assert f"usage: python -m qa_extraction {name}" in help_text("python", "-m", "qa_extraction", name)


# --- the full-run block -------------------------------------------------------------------------------------


def _check_options(argv: list[str], help_: str, where: str) -> None:
    """Every ``--option`` of ``argv`` is in ``help_``; the value of an option with listed choices is one."""
    for index, arg in enumerate(argv):
        if not arg.startswith("-"):
            continue
        option = arg.split("=", 1)[0]
        assert re.search(rf"(?<![\w-]){re.escape(option)}(?![\w-])", help_), (
            f"{where}: {option} not in --help"
        )
        choices = re.search(rf"(?<![\w-]){re.escape(option)} \{{([^}}]*)\}}", help_)
        if choices and index + 1 < len(argv):
            assert argv[index + 1] in choices.group(1).split(","), f"{where}: {option} {argv[index + 1]}"
        if option in SHIPPED_FILE_OPTIONS and "/" in argv[index + 1]:
            assert (ROOT / argv[index + 1]).is_file(), f"{where}: {argv[index + 1]} is not in the repository"


def _check_train_command(argv: list[str], where: str) -> None:
    """``scripts/train.py`` arguments: options of `vlsurv train` (the script runs it) and overrides that the
    named config accepts (keys and values; paths are not opened)."""
    from vlsurv.training.config import load_train_config

    _check_options(argv, help_text("vlsurv", "train"), where)
    overrides = [arg for arg in argv if "=" in arg and not arg.startswith("-")]
    load_train_config(
        ROOT / argv[argv.index("--config") + 1], overrides
    )  # an unknown key or bad value raises


def test_every_option_of_the_full_run_exists():
    commands = block_commands(readme_block("full-run"))
    launches = []
    for argv in commands:
        where = shlex.join(argv)[:90]
        if argv[0] == "export":
            name = argv[1].split("=", 1)[0]
            assert any(name in p.read_text() for p in (ROOT / "qa_extraction").rglob("*.py")), where
        elif argv[0] == "vlsurv":
            _check_options(argv[2:], help_text("vlsurv", argv[1]), where)
        elif argv[:3] == ["python", "-m", "qa_extraction"]:
            _check_options(argv[4:], help_text("python", "-m", "qa_extraction", argv[3]), where)
        elif argv[:2] == ["accelerate", "launch"]:
            script = next(i for i, arg in enumerate(argv) if arg.endswith(".py"))
            assert (ROOT / argv[script]).is_file(), where
            _check_options(argv[2:script], help_text("accelerate", "launch"), where)
            _check_train_command(argv[script + 1 :], where)
            launches.append(argv)
        else:
            pytest.fail(f"full-run block: unknown command {where}")
    assert any(argv[-2:] == ["--resume", "latest"] for argv in launches), (
        "no run resumed with --resume latest"
    )
    assert any(
        argv[argv.index("--num_processes") + 1] == "2" for argv in launches if "--num_processes" in argv
    )


# --- the walkthrough ----------------------------------------------------------------------------------------


def _clone_root(folder: Path) -> Path:
    """A folder laid out as a fresh clone's root after ``make``: configs/, scripts/, prompts/ and .venv."""
    for name in CLONE_FOLDERS:
        shutil.copytree(ROOT / name, folder / name, ignore=shutil.ignore_patterns("__pycache__"))
    if (Path(sys.prefix) / "bin" / "activate").is_file():
        (folder / ".venv").symlink_to(Path(sys.prefix), target_is_directory=True)
    else:  # not a virtualenv: an activate script that puts this interpreter's commands first
        (folder / ".venv" / "bin").mkdir(parents=True)
        (folder / ".venv" / "bin" / "activate").write_text(f'export PATH="{BIN}:$PATH"\n')
    return folder


@pytest.fixture(scope="module")
def walkthrough(tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess, float]:
    """(root, result, seconds) of the README's walkthrough block run by bash, which stops at a failure."""
    root = _clone_root(tmp_path_factory.mktemp("clone"))
    start = time.perf_counter()
    result = subprocess.run(
        ["bash", "-e", "-o", "pipefail", "-c", readme_block("walkthrough")],
        cwd=root,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=1800,
    )
    return root, result, time.perf_counter() - start


@pytest.mark.timeout(1900)
def test_the_walkthrough_runs_as_written(walkthrough):
    _, result, seconds = walkthrough
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-6000:]
    assert "Traceback" not in output, output[-6000:]
    print(f"walkthrough: {seconds:.0f} s")


@pytest.mark.timeout(1900)
def test_the_tiny_configs_read_what_the_walkthrough_wrote(walkthrough):
    from vlsurv.encoders.cache import FeatureCache
    from vlsurv.training.config import load_train_config

    root, result, _ = walkthrough
    assert result.returncode == 0
    for name in TINY_CONFIGS:
        config = load_train_config(root / "configs" / "tiny" / f"{name}.yaml")
        for path in (config.data.manifest, config.data.vqa, config.data.cache, config.model.decoder_path):
            assert (root / path).exists(), (name, path)
        assert (root / config.output_dir / "final" / "selection.json").is_file(), name
        if config.stage == 2:
            assert (root / config.data.stage1_dir).is_dir(), name
        tokens = FeatureCache(root / config.data.cache).token_shape
        assert tokens == (config.model.num_image_tokens, config.model.image_token_dim), name


@pytest.mark.timeout(1900)
def test_the_walkthrough_predicts_every_scan_and_evaluates_val_and_test(walkthrough):
    root, result, _ = walkthrough
    assert result.returncode == 0
    manifest = pd.read_csv(root / "runs/tiny/cohort/manifest.csv", dtype={"scan_id": str})
    predictions = pd.read_csv(root / "runs/tiny/predictions/predictions.csv", dtype={"scan_id": str})
    assert sorted(predictions["scan_id"]) == sorted(manifest["scan_id"])
    metrics = json.loads((root / "runs/tiny/eval/metrics.json").read_text())
    assert metrics["n"] == int((manifest["split"] != "train").sum())
    assert 0.0 <= metrics["c_index"] <= 1.0
    assert (root / "runs/tiny/eval/report.html").is_file()
