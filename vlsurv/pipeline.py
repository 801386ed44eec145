"""The Python front door: one CT scan + its clinical fields -> six answers, their risks, the risk, S(t).

    from vlsurv.pipeline import SurvivalPipeline

    pipe = SurvivalPipeline.from_pretrained("runs/stage2/final", encoder_checkpoint="merlin/i3_resnet.pt")
    out = pipe("scans/p001.nii.gz", {"age": 64, "sex": "male", "smoking": "former", "stage": "3"})
    out.answers["pleura"], out.question_risks["pleura"], out.risk, out.survival_times, out.survival

``from_pretrained`` loads the model folder and the encoder it was trained with once: the folder's
``image_encoder.json`` (written by training from its feature cache) gives the encoder config, checkpoint
sha256, preprocessing and token dtype, and a checkpoint or preprocessing that differs is refused
(``EncoderMismatchError``). Each call loads the scan (NIfTI file or DICOM folder, ``vlsurv.data.ct``),
preprocesses it as `vlsurv encode` does, encodes it to tokens (T, C) rounded through the cache's dtype, and
scores the prompt ensemble with ``vlsurv.inference.predict_scans``, the code `vlsurv predict` runs, so a
scan gets the same answers and risks either way.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import torch

from vlsurv.data.clinical import sentence_function
from vlsurv.data.ct import CTVolume
from vlsurv.data.transforms import PreprocessConfig, preprocess_ct
from vlsurv.encoders.cache import encode_volumes
from vlsurv.encoders.merlin import MerlinImageEncoder
from vlsurv.encoders.provenance import check_encoder_matches, load_recorded_encoder, read_provenance
from vlsurv.inference import ScanPrediction, load_model, predict_scans, resolve_device
from vlsurv.model.ensemble import ScanInput
from vlsurv.model.vlm import VisionLanguageSurvivalModel
from vlsurv.predict import PredictConfig
from vlsurv.prompts import load_questions

NIFTI_SUFFIXES = (".nii.gz", ".nii")


class SurvivalPipeline:
    """A trained model, its image encoder and preprocessing, and the prediction options (``PredictConfig``:
    questions, pool, decoding, seed, clinical_missing_warn). ``token_dtype`` and ``compute``: the storage
    dtype and encoder precision of the cache the model was trained on (its ``image_encoder.json``)."""

    def __init__(
        self,
        model: VisionLanguageSurvivalModel,
        encoder: MerlinImageEncoder,
        preprocess: PreprocessConfig,
        config: PredictConfig | None = None,
        token_dtype: str = "float32",
        compute: str = "float32",
    ) -> None:
        self.config = (config or PredictConfig()).with_decoding(model)
        self.model = model.eval()
        self.device = self.model.language_model.get_input_embeddings().weight.device
        self.encoder = encoder.to(self.device).eval()
        self.preprocess = preprocess
        self.token_dtype = token_dtype
        self.compute = compute
        self.questions = load_questions(self.config.questions)

    @classmethod
    def from_pretrained(
        cls,
        model_dir: str | Path,
        *,
        encoder_checkpoint: str | Path | None = None,
        encoder: MerlinImageEncoder | None = None,
        **options,
    ) -> SurvivalPipeline:
        """Load ``model_dir`` and its recorded encoder (from ``encoder_checkpoint``, or rebuilt when it was
        random-init), or check the given ``encoder`` against the record. ``options`` are ``PredictConfig``
        fields (questions, pool, max_new_tokens, generate, do_sample, temperature, seed, device, ...)."""
        config = PredictConfig(
            model=str(model_dir), encoder_checkpoint=str(encoder_checkpoint or ""), **options
        )
        return cls.from_config(config, encoder)

    @classmethod
    def from_config(
        cls, config: PredictConfig, encoder: MerlinImageEncoder | None = None
    ) -> SurvivalPipeline:
        """``from_pretrained`` with the options already in a ``PredictConfig`` (`vlsurv predict --image`)."""
        if encoder is None:
            encoder, preprocess, key = load_recorded_encoder(config.model, config.encoder_checkpoint or None)
        else:
            record, _, preprocess = read_provenance(config.model)
            check_encoder_matches(config.model, record, encoder, preprocess)
            key = record["key"]
        model = load_model(config.model, resolve_device(config.device))
        return cls(model, encoder, preprocess, config, key["dtype"], key["compute"])

    @torch.inference_mode()
    def encode(self, image: str | Path | CTVolume) -> torch.Tensor:
        """Image tokens (T, C) float32 on the CPU, computed in the training cache's precision (bfloat16
        autocast when it was) and rounded through its storage dtype."""
        name = _name(image)
        volume = preprocess_ct(image, self.preprocess)[None]
        bf16 = self.compute == "bfloat16"
        return encode_volumes(self.encoder, volume, [name], self.token_dtype, bf16)[name].float()

    def __call__(
        self,
        image: str | Path | CTVolume,
        clinical: Mapping | None = None,
        scan_id: str | None = None,
    ) -> ScanPrediction:
        """The ``ScanPrediction`` of one scan: a NIfTI path, a DICOM series folder or a loaded ``CTVolume``,
        with its clinical fields (those of the model's clinical template; missing ones are warned about)."""
        scan_id = scan_id or _name(image)
        fields = dict(clinical or {})
        sentence = sentence_function(
            [fields],
            self.model.config.clinical_template,
            max_missing_fraction=self.config.clinical_missing_warn,
            where=f"clinical fields of {scan_id}",
            option="clinical_missing_warn",
        )(fields)
        scan = ScanInput(scan_id, sentence, self.encode(image), self.model.covariates_of(fields))
        generator = torch.Generator(device=self.device).manual_seed(self.config.seed)
        options = self.config.decode_options()
        return predict_scans(self.model, [scan], self.questions, self.config.pool, options, generator)[0]


def _name(image: str | Path | CTVolume) -> str:
    """A scan id from the file or folder name, without the NIfTI suffix."""
    if isinstance(image, CTVolume):
        return str(Path(image.source).name) if image.source else "scan"
    name = Path(image).name
    return next((name[: -len(s)] for s in NIFTI_SUFFIXES if name.lower().endswith(s)), name)
