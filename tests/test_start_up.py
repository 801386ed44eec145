"""Start-up: what each command's module loads when it is imported (checked in a fresh interpreter each).

Heavy libraries load inside the functions that need them (see the comments at those imports), so
`vlsurv --help` and each command's ``--help`` start without them; the training modules import the
scheduler after the model, so a full-precision run never loads bitsandbytes.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
HEAVY = (
    "torch",
    "transformers",
    "peft",
    "monai",
    "sksurv",
    "lifelines",
    "bert_score",
    "matplotlib",
    "bitsandbytes",
)


def loaded_after_import(module: str) -> list[str]:
    """The HEAVY libraries in ``sys.modules`` after ``import module`` in a fresh interpreter."""
    code = f"import json, sys, {module}; print(json.dumps([m for m in {HEAVY!r} if m in sys.modules]))"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize(
    ("module", "allowed"),
    [
        ("vlsurv.cli", ()),
        ("vlsurv.data.synthetic", ()),
        ("vlsurv.data.inspect_v2", ()),
        ("vlsurv.evaluate", ()),
        ("qa_extraction.extract", ()),
        ("vlsurv.demo", ()),
        ("vlsurv.predict", ("torch",)),
        ("vlsurv.horizon.cli", ()),
    ],
)
def test_a_command_module_loads_no_heavy_library_it_does_not_need_at_import(module, allowed):
    assert sorted(set(loaded_after_import(module)) - set(allowed)) == []


def test_the_training_loop_does_not_import_bitsandbytes():
    loaded = loaded_after_import("vlsurv.training.loop")
    assert "torch" in loaded  # the check sees what is loaded
    assert "bitsandbytes" not in loaded and "peft" not in loaded
