"""A wheel (``pip install .``, not editable) carries prompts/ and configs/ and works outside the
repository."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SOURCES = ("pyproject.toml", "README.md", "vlsurv", "qa_extraction", "prompts", "configs")
RESOURCES = {"prompts": "vlsurv._resources.prompts", "configs": "vlsurv._resources.configs"}


def _setuptools() -> dict:
    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]


def test_every_package_and_resource_folder_is_listed_in_pyproject():
    listed = set(_setuptools()["packages"])
    code = {
        ".".join(p.parent.relative_to(ROOT).parts)
        for top in ("vlsurv", "qa_extraction")
        for p in (ROOT / top).rglob("__init__.py")
    }
    resources = {
        ".".join((RESOURCES[top], *d.relative_to(ROOT / top).parts)).rstrip(".")
        for top in RESOURCES
        for d in (ROOT / top, *(ROOT / top).rglob("*"))
        if d.is_dir()
    }
    assert listed == code | resources
    assert _setuptools()["package-dir"] == {package: top for top, package in RESOURCES.items()}


def test_a_source_checkout_reads_the_top_level_folders_and_vlsurv_prompts_overrides(tmp_path):
    from vlsurv.demo import CONFIGS_DIR
    from vlsurv.prompts import PROMPTS_DIR, resource_dir

    assert resource_dir("prompts") == PROMPTS_DIR == ROOT / "prompts"
    assert CONFIGS_DIR == ROOT / "configs"
    (tmp_path / "questions").mkdir()
    (tmp_path / "questions" / "mine.yaml").write_text(
        "questions:\n  - id: mass\n    text: Is there a mass?\n"
    )
    code = "from vlsurv.prompts import load_questions; print([q.id for q in load_questions('mine')])"
    env = {**os.environ, "VLSURV_PROMPTS": str(tmp_path)}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    assert result.stdout.strip() == "['mass']"


def build_and_install(source: Path, tmp: Path) -> Path:
    """Build a wheel of a copy of ``source`` and install it (no dependencies) into a fresh venv under ``tmp``
    that reaches this interpreter's packages through a .pth file; return the venv's bin folder."""
    copy = tmp / "src"
    copy.mkdir()
    for name in SOURCES:
        if (source / name).is_dir():
            shutil.copytree(source / name, copy / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(source / name, copy / name)
    pip = [sys.executable, "-m", "pip"]
    subprocess.run(
        [
            *pip,
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "--no-index",
            "-q",
            "-w",
            str(tmp / "dist"),
            str(copy),
        ],
        check=True,
        cwd=tmp,
        capture_output=True,
    )
    wheel = next((tmp / "dist").glob("vlsurv-*.whl"))
    venv = tmp / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = venv / "bin" / "python"
    subprocess.run(
        [*pip, "--python", str(python), "install", "--no-deps", "--no-index", "-q", str(wheel)],
        check=True,
        capture_output=True,
    )
    purelib = subprocess.run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()
    Path(purelib, "dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    return venv / "bin"


CHECK_INSTALLED = """
from pathlib import Path
import vlsurv, sys
from vlsurv.prompts import PROMPTS_DIR, load_questions, read_template
from vlsurv.data.clinical import load_template
from vlsurv.demo import CONFIGS_DIR
from vlsurv.training.config import load_train_config
from qa_extraction.text import Lexicon
venv = Path(sys.prefix)
assert Path(vlsurv.__file__).is_relative_to(venv), vlsurv.__file__
assert PROMPTS_DIR.is_relative_to(venv) and CONFIGS_DIR.is_relative_to(venv), (PROMPTS_DIR, CONFIGS_DIR)
questions = load_questions("lung")
assert "<image>" in read_template("model/plain.txt")
load_template("lung")
Lexicon.from_file()
for stage in ("stage1", "stage2_deepsurv", "stage2_deephit"):
    load_train_config(CONFIGS_DIR / "tiny" / f"{stage}.yaml")
from vlsurv.encoders.generator_pretrain import BUILTIN_CHECKPOINT, load_builtin_encoder
assert BUILTIN_CHECKPOINT.is_relative_to(venv), BUILTIN_CHECKPOINT
load_builtin_encoder()
print(len(questions), "questions")
"""


@pytest.mark.slow
def test_wheel_installed_outside_the_repo_finds_prompts_and_configs(tmp_path):
    bin_dir = build_and_install(ROOT, tmp_path)
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VLSURV_PROMPTS")}
    synth = subprocess.run(
        [str(bin_dir / "vlsurv"), "synth", "--n", "4", "--out", "cohort", "--shape", "8", "8", "4"],
        cwd=outside,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert synth.returncode == 0, synth.stderr
    assert (outside / "cohort" / "manifest.csv").is_file()
    check = subprocess.run(
        [str(bin_dir / "python"), "-c", CHECK_INSTALLED],
        cwd=outside,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert check.returncode == 0, check.stderr
    assert check.stdout.strip() == "6 questions"
