"""Progress output: a redrawn bar on a terminal, sparse lines (no ``\\r``) on a file or pipe, and no bars from
transformers when the CLI's stderr is not a terminal."""

from __future__ import annotations

import io
import os
import subprocess
import sys
from pathlib import Path

import pytest

from vlsurv.progress import HF_BARS_ENV, progress_bar, quiet_library_bars

ROOT = Path(__file__).resolve().parents[1]


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def _run_bar(stream, steps: int = 500) -> str:
    with progress_bar(total=steps, desc="encode", unit="scan", stream=stream) as bar:
        for _ in range(steps):
            bar.update(1)
            bar.set_postfix(loss="0.1234", refresh=False)
    return stream.getvalue()


def test_a_file_gets_sparse_lines_and_no_carriage_return():
    text = _run_bar(io.StringIO())
    lines = text.splitlines()
    assert "\r" not in text and text.endswith("\n")
    assert 1 <= len(lines) <= 3, lines  # the start, the end (and at most one line per 30 s)
    assert lines[-1].startswith("encode: 100%") and "500/500" in lines[-1]


def test_a_terminal_keeps_the_redrawn_bar():
    text = _run_bar(Terminal(), steps=5)
    assert "\r" in text and "5/5" in text


def test_a_disabled_bar_writes_nothing():
    stream = io.StringIO()
    with progress_bar(total=3, desc="predict", enabled=False, stream=stream) as bar:
        bar.update(3)
    assert stream.getvalue() == ""


def test_library_bars_stay_on_for_a_terminal_and_respect_the_users_setting(monkeypatch):
    monkeypatch.delenv(HF_BARS_ENV, raising=False)
    quiet_library_bars(Terminal())
    assert HF_BARS_ENV not in os.environ
    monkeypatch.setenv(HF_BARS_ENV, "0")
    quiet_library_bars(io.StringIO())
    assert os.environ[HF_BARS_ENV] == "0"


@pytest.mark.slow
def test_cli_output_to_a_pipe_has_no_carriage_return(tmp_path):
    """`vlsurv build-tiny` (transformers' "Writing model shards") then `vlsurv encode` (our bar), stderr
    piped."""
    (tmp_path / "texts.txt").write_text("A small left pleural effusion.\nNo distant metastases.\n")
    (tmp_path / "preprocess.yaml").write_text("spacing: [12.0, 12.0, 12.0]\nspatial_size: [32, 32, 16]\n")
    script = (
        "import sys\nfrom vlsurv.cli import main\n"
        "from vlsurv.data.synthetic import make_cohort\n"
        f"make_cohort(3, 0, {str(tmp_path / 'cohort')!r}, shape=(32, 32, 16))\n"
        f"assert main(['build-tiny', '--out', {str(tmp_path / 'decoder')!r}, '--texts', "
        f"{str(tmp_path / 'texts.txt')!r}, '--hidden', '16', '--vocab-size', '300']) == 0\n"
        f"assert main(['encode', '--manifest', {str(tmp_path / 'cohort' / 'manifest.csv')!r}, '--out', "
        f"{str(tmp_path / 'cache')!r}, '--encoder', 'tiny', '--preprocess-config', "
        f"{str(tmp_path / 'preprocess.yaml')!r}]) == 0\n"
    )
    env = {key: value for key, value in os.environ.items() if key != HF_BARS_ENV}
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, cwd=ROOT, env=env, timeout=600)
    stderr = done.stderr.decode()  # bytes: text mode would turn each "\r" into "\n"
    assert done.returncode == 0, stderr[-3000:]
    assert b"\r" not in done.stdout + done.stderr
    assert "encode: 100%" in stderr and "3/3" in stderr
