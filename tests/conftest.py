"""Shared test helpers: a tiny Llama decoder directory built once per session and a model config for it; the
tiny training inputs (cohort, VQA file, feature cache) and configs; a fixed global batch for the distributed
tests.

Test files import the plain helpers with ``from conftest import ...`` (``tests/`` is on ``sys.path``, also for
the files that ``accelerate launch`` runs as scripts).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

TINY_TEXTS = [
    "64 year-old male former smoker lung cancer patient, stage 1, T stage is T2, N stage is N1, M "
    "stage is M0.",
    "71 year-old female never smoker lung cancer patient, stage 3, T stage is T4, N stage is N2, M "
    "stage is M1.",
    "What is the location and size of the primary lung tumor?",
    "Which lymph nodes are involved, and what are their size and location?",
    "Is there any pleural involvement or effusion present?",
    "Are metastases or involvement of other organs observed?",
    "Are major vessels involved or compressed?",
    "Are there skeleton/bone changes on the scan?",
    "A 3.2 cm spiculated mass in the right upper lobe.",
    "Enlarged subcarinal lymph node measuring 1.4 cm.",
    "Small left pleural effusion. No pleural thickening.",
    "No distant metastases. No bone lesions. The aorta is not involved.",
]

TINY_IMAGE_DIM = 16
TINY_IMAGE_TOKENS = 4


@pytest.fixture(scope="session")
def tiny_decoder_dir(tmp_path_factory) -> Path:
    """A 2-layer, 64-hidden Llama + byte-level BPE tokenizer saved with ``save_pretrained`` (plain
    prompts)."""
    from vlsurv.model.tiny import build_tiny_decoder

    return build_tiny_decoder(
        tmp_path_factory.mktemp("tiny_decoder"),
        TINY_TEXTS * 4,
        num_layers=2,
        hidden_size=64,
        num_heads=4,
        vocab_size=400,
    )


@pytest.fixture
def tiny_model_config(tiny_decoder_dir):
    """A ``ModelConfig`` over the tiny decoder with 4 image tokens of width 16 and LoRA on q/v."""
    from vlsurv.model import LoRAConfig, ModelConfig

    return ModelConfig(
        decoder_path=str(tiny_decoder_dir),
        image_token_dim=TINY_IMAGE_DIM,
        num_image_tokens=TINY_IMAGE_TOKENS,
        lora=LoRAConfig(r=4, alpha=8, dropout=0.0, target_modules=["q_proj", "v_proj"]),
    )


# --- tiny training inputs: a synthetic cohort, its VQA file and feature cache -------------------------------

TINY_COHORT_PATIENTS = 24
ROOT = Path(__file__).resolve().parents[1]


def _answer(question_id: str, f: dict) -> str:
    """A short answer from the ground-truth findings of one scan."""

    def has(key):
        return bool(f[key])

    if question_id == "tumor":
        return (
            f"A {f['tumor_size_mm']:.0f} mm mass in the {f['tumor_lobe']}."
            if has("tumor")
            else "No primary mass."
        )
    if question_id == "lymph_nodes":
        return (
            f"Enlarged {f['node_station']} node, {f['node_size_mm']:.0f} mm."
            if has("lymph_nodes")
            else ("No enlarged lymph nodes.")
        )
    if question_id == "pleura":
        return f"{f['effusion_side']} pleural effusion." if has("pleura") else "No pleural effusion."
    if question_id == "metastases":
        return f"Metastases: {f['metastasis_sites']}." if has("metastases") else "No distant metastases."
    if question_id == "vessels":
        return f"The {f['vessel']} is involved." if has("vessels") else "Major vessels are not involved."
    return f"{f['bone_lesion_type']} lesion of the {f['bone_site']}." if has("bone") else "No bone lesions."


def build_tiny_inputs(root: Path, n: int = TINY_COHORT_PATIENTS, seed: int = 0) -> dict[str, Path]:
    """{manifest, vqa, cache} for a tiny cohort under ``root``: ``make_cohort``, a VQA file written from its
    findings, and a feature cache from the tiny Merlin-architecture encoder (4 tokens x 256 per scan)."""
    import pandas as pd

    from vlsurv.data.synthetic import make_cohort
    from vlsurv.data.transforms import PreprocessConfig
    from vlsurv.encoders.cache import encode_manifest
    from vlsurv.encoders.merlin import MerlinImageEncoder
    from vlsurv.prompts import load_questions

    manifest = make_cohort(n, seed, root / "cohort", shape=(48, 48, 32))
    findings = pd.read_csv(root / "cohort" / "findings.csv").to_dict("records")
    rows = [
        {"scan_id": f["scan_id"], "question_id": q.id, "question": q.text, "answer": _answer(q.id, f)}
        for f in findings
        for q in load_questions("lung")
    ]
    vqa = root / "vqa.jsonl"
    vqa.write_text("".join(json.dumps(r) + "\n" for r in rows))
    preprocess = PreprocessConfig(spacing=(6.0, 6.0, 6.0), spatial_size=(64, 64, 32))
    encode_manifest(manifest, root / "cache", MerlinImageEncoder.tiny(), preprocess, progress=False)
    return {"manifest": manifest, "vqa": vqa, "cache": root / "cache"}


def tiny_config(name: str, inputs: dict, decoder: Path, out: Path, *overrides: str):
    """configs/tiny/<name>.yaml (a ``TrainConfig``) pointed at the test's cohort, decoder and output
    folder."""
    from vlsurv.training.config import load_train_config

    return load_train_config(
        ROOT / f"configs/tiny/{name}.yaml",
        [
            f"data.manifest={inputs['manifest']}",
            f"data.vqa={inputs['vqa']}",
            f"data.cache={inputs['cache']}",
            f"model.decoder_path={decoder}",
            f"output_dir={out}",
            "tracker=none",
            *overrides,
        ],
    )


# --- a fixed global batch for the one-process vs two-process (and window risk set) comparisons --------------

GLOBAL_BATCH = 7
CUTS = [100.0, 400.0, 900.0]
TIMES = [50.0, 800.0, 300.0, 300.0, 1200.0, 90.0, 650.0]
EVENTS = [1, 0, 1, 1, 0, 1, 1]
TEXTS = [
    (
        "64 year-old male former smoker.",
        "What is the location and size of the primary lung tumor?",
        "A 3.2 cm spiculated mass in the right upper lobe.",
    ),
    (
        "71 year-old female never smoker.",
        "Is there any pleural involvement or effusion present?",
        "Small left pleural effusion.",
    ),
    (
        "58 year-old male.",
        "Are metastases or involvement of other organs observed?",
        "No distant metastases.",
    ),
]


def build_model(decoder: str, head: str, lora_dropout: float = 0.0):
    """A seeded tiny stage-2 model (LoRA + survival branch trainable); DeepHit gets fixed cuts."""
    import torch

    from vlsurv.model import LoRAConfig, ModelConfig, SurvivalConfig, VisionLanguageSurvivalModel
    from vlsurv.model.survival import DeepHitCuts

    torch.manual_seed(0)
    config = ModelConfig(
        decoder_path=decoder,
        image_token_dim=16,
        num_image_tokens=4,
        lora=LoRAConfig(r=4, alpha=8, dropout=lora_dropout, target_modules=["q_proj", "v_proj"]),
        survival=SurvivalConfig(head=head, num_bins=len(CUTS)),
    )
    model = VisionLanguageSurvivalModel(config)
    if head == "deephit":
        model.set_deephit_cuts(DeepHitCuts(CUTS))
    model.set_stage(2)
    with torch.no_grad():  # LoRA B starts at zero; move it so that every LoRA gradient is informative
        for name, p in model.language_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, 0.02)
    return model


def global_batch(processor, indices: list[int], cuts=None) -> dict:
    """The rows ``indices`` of the fixed global batch, right-padded; with DeepHit ``cuts``, each row's labels
    (``bin_index``, ``binned_event``, ``censored_credit``) as ``SampleDataset.set_deephit_cuts`` gives
    them."""
    import torch

    generator = torch.Generator().manual_seed(1)
    tokens = torch.randn(GLOBAL_BATCH, 4, 16, generator=generator)
    labels = None if cuts is None else cuts.labels(torch.tensor(TIMES), torch.tensor(EVENTS))
    items = []
    for i in indices:
        clinical, question, answer = TEXTS[i % len(TEXTS)]
        item = processor.encode(clinical, question, answer if i % 4 else answer + " Stable.")
        item.update(image_tokens=tokens[i], time=torch.tensor(TIMES[i]), event=torch.tensor(EVENTS[i]))
        if labels is not None:
            item.update(
                bin_index=labels.bin_index[i],
                binned_event=labels.event[i],
                censored_credit=labels.censored_credit[i],
            )
        items.append(item)
    return processor.collate(items)


def run_step(forward, batch: dict):
    """(loss parts, the tensor to backpropagate) of the stage-2 step loss on ``batch`` through ``forward``."""
    from vlsurv.training.config import LossConfig
    from vlsurv.training.objective import step_loss

    output = forward(
        input_ids=batch["input_ids"],
        attention_mask=batch["attention_mask"],
        image_tokens=batch["image_tokens"],
        pool_mask=batch["attention_mask"],
    )
    loss = step_loss(output, batch, stage=2, config=LossConfig(deephit_ranking_weight=0.5))
    return loss.parts, loss.to_backpropagate


def gradients(model) -> dict:
    """{name: a copy of the gradient} of every trainable parameter."""
    return {name: p.grad.detach().clone() for name, p in model.named_parameters() if p.requires_grad}


def launch_on_two_cpu_processes(script, *arguments: str, timeout: int = 300) -> None:
    """`accelerate launch` ``script`` with ``arguments`` on 2 CPU processes (gloo); fails with stderr's
    tail."""
    command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2"]
    command += ["--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
    command += ["--main_process_port", "0", str(script), *arguments]
    done = subprocess.run(command, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, done.stderr[-3000:]


def write_launched_step(accelerator, out: Path, results: dict[str, dict], models: dict) -> None:
    """What ``compare_launched_step_with_one_process`` reads: the loss parts per head (``out/parts.json``)
    and each head's gradients (``out/grads_<head>.safetensors``), written by the main process."""
    from safetensors.torch import save_file

    if accelerator.is_main_process:
        for head, model in models.items():
            save_file(gradients(model), str(out / f"grads_{head}.safetensors"))
        (out / "parts.json").write_text(json.dumps({"world": accelerator.num_processes, **results}))
    accelerator.wait_for_everyone()


def compare_launched_step_with_one_process(decoder: Path, out: Path) -> dict[str, dict]:
    """The loss parts (``out/parts.json``) and gradients (``out/grads_<head>.safetensors``) that a 2-process
    launch wrote for the fixed global batch equal one process's on the same batch (1e-6); returns the
    one-process gradients per head."""
    import torch
    from safetensors.torch import load_file

    launched = json.loads((out / "parts.json").read_text())
    assert launched["world"] == 2
    references = {}
    for head in ("deepsurv", "deephit"):
        model = build_model(str(decoder), head)
        batch = global_batch(model.processor, list(range(GLOBAL_BATCH)), model.deephit_cuts)
        parts, backward = run_step(model, batch)
        backward.backward()
        assert parts.keys() == launched[head].keys()
        for name, value in parts.items():
            assert launched[head][name] == pytest.approx(value, abs=1e-6, rel=1e-6), (head, name)
        reference = gradients(model)
        distributed = {
            k.removeprefix("module."): v for k, v in load_file(str(out / f"grads_{head}.safetensors")).items()
        }
        assert distributed.keys() == reference.keys()
        for name, grad in reference.items():
            torch.testing.assert_close(distributed[name], grad, atol=1e-6, rtol=1e-5, msg=f"{head} {name}")
        references[head] = reference
    return references


# --- a DICOM CT series written with pydicom ------------------------------------------------------------


def write_dicom_series(
    folder,
    stored,
    *,
    series_uid=None,
    slope=2.0,
    intercept=-1024.0,
    pixel_spacing=(0.7, 0.6),
    z_positions=None,
):
    """Write ``stored`` (Rows, Columns, n_slices) uint16 as an axial series, files in shuffled order."""
    import numpy as np
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

    folder.mkdir(parents=True, exist_ok=True)
    series_uid = series_uid or generate_uid()
    n_slices = stored.shape[2]
    z_positions = z_positions if z_positions is not None else [10.0 + 2.5 * k for k in range(n_slices)]
    for file_index, k in enumerate(np.random.default_rng(0).permutation(n_slices)):
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = CTImageStorage
        meta.MediaStorageSOPInstanceUID = generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = Dataset()
        ds.file_meta = meta
        ds.SOPClassUID = CTImageStorage
        ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
        ds.SeriesInstanceUID = series_uid
        ds.Modality = "CT"
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        ds.ImagePositionPatient = [-50.0, -40.0, float(z_positions[k])]
        ds.PixelSpacing = list(pixel_spacing)
        ds.SliceThickness = 2.5
        ds.RescaleSlope = slope
        ds.RescaleIntercept = intercept
        ds.Rows, ds.Columns = stored.shape[:2]
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.BitsAllocated = 16
        ds.BitsStored = 16
        ds.HighBit = 15
        ds.PixelRepresentation = 0
        ds.PixelData = np.ascontiguousarray(stored[:, :, k].astype(np.uint16)).tobytes()
        ds.save_as(str(folder / f"IM{file_index:04d}.dcm"), enforce_file_format=True)
    return folder
