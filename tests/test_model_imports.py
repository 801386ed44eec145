"""A full-precision model loads and scores without bitsandbytes and without deprecation warnings.

peft imports bitsandbytes whenever it is installed, which logs "Failed to load CPU gemm_4bit_forward" on some
CPUs; ``vlsurv.model.vlm_io`` hides it unless k-bit weights are asked for. Checked in a fresh interpreter,
since another test may already have imported bitsandbytes in this one.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

SCRIPT = """
import json, sys, warnings
warnings.simplefilter("error", FutureWarning)
import torch
from vlsurv.model import LoRAConfig, ModelConfig, VisionLanguageSurvivalModel
from vlsurv.model.ensemble import DecodeOptions, ScanInput, score_shared_prefix
config = ModelConfig(decoder_path=sys.argv[1], image_token_dim=16, num_image_tokens=4,
                     lora=LoRAConfig(r=4, alpha=8, dropout=0.0, target_modules=["q_proj", "v_proj"]))
model = VisionLanguageSurvivalModel(config)
scans = [ScanInput("a", "64 year-old male former smoker.", torch.randn(4, 16))]
score_shared_prefix(model, scans, ["Are metastases observed?", "Is there an effusion?"],
                    options=DecodeOptions(max_new_tokens=3))
from peft.import_utils import is_bnb_available
print(json.dumps({"bitsandbytes_imported": "bitsandbytes" in sys.modules,
                  "peft_sees_it": is_bnb_available()}))
"""


@pytest.mark.skipif(importlib.util.find_spec("bitsandbytes") is None, reason="bitsandbytes is not installed")
def test_full_precision_model_does_not_import_bitsandbytes_nor_warn(tiny_decoder_dir):
    done = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(tiny_decoder_dir)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    state = json.loads(done.stdout.strip().splitlines()[-1])
    assert state == {"bitsandbytes_imported": False, "peft_sees_it": True}  # hidden, then visible again
    for message in ("gemm_4bit_forward", "past_key_values", "is_gradient_checkpointing", "deprecated"):
        assert message not in done.stderr
