"""Clinical sentences from the template files in prompts/clinical/."""

from __future__ import annotations

import math

import pandas as pd
import pytest

from vlsurv.data.clinical import (
    ClinicalTemplateError,
    MissingClinicalFieldsWarning,
    available_templates,
    clinical_sentence,
    is_missing,
    missing_field_fractions,
    sentence_function,
    warn_missing_fields,
)
from vlsurv.data.synthetic import build_cohort_table

LUNG_ROW = {
    "age": 64,
    "sex": "male",
    "smoking": "former",
    "stage": 1,
    "t_stage": "T4",
    "n_stage": "N1",
    "m_stage": "M0",
}
PE_ROW = {
    "age": 61,
    "gender": "F",
    "pe_positive": 1,
    "pe_acute": True,
    "pe_subsegmentalonly": 0,
    "temperature": 98.6,
    "respiratory_rate": 18,
    "mean_arterial_pressure": 124,
    "pulse": 65,
}
LUNG_SENTENCE = (
    "64 year-old male former smoker lung cancer patient, stage 1, T stage is T4, N stage is N1, M stage "
    "is M0."
)
PE_SENTENCE = (
    "A 61-year-old female, acute pulmonary embolism (not limited to subsegmental arteries), temperature "
    "98.6 F, respiratory rate 18.0 breaths per minute, mean arterial pressure 124.0 mmHg, pulse 65.0 bpm."
)


def test_lung_sentence_is_exact():
    assert clinical_sentence(LUNG_ROW) == LUNG_SENTENCE
    assert clinical_sentence(LUNG_ROW, template="lung") == LUNG_SENTENCE


def test_pe_sentence_is_exact():
    assert clinical_sentence(PE_ROW, template="pe") == PE_SENTENCE


@pytest.mark.parametrize("missing", [None, math.nan, "", "  ", "nan", "None", pd.NA])
def test_missing_lung_values_drop_their_clause(missing):
    row = {**LUNG_ROW, "smoking": missing, "n_stage": missing, "age": missing}
    sentence = clinical_sentence(row)
    assert sentence == "Male lung cancer patient, stage 1, T stage is T4, M stage is M0."
    assert "nan" not in sentence.lower() and "none" not in sentence.lower()


def test_missing_pe_values_drop_their_clause():
    row = {**PE_ROW, "temperature": math.nan, "pe_acute": None, "pulse": ""}
    assert clinical_sentence(row, "pe") == (
        "A 61-year-old female, pulmonary embolism (not limited to subsegmental arteries), "
        "respiratory rate 18.0 "
        "breaths per minute, mean arterial pressure 124.0 mmHg."
    )
    row = {**PE_ROW, "pe_positive": None, "age": None, "gender": None}
    assert clinical_sentence(row, "pe") == (
        "Temperature 98.6 F, respiratory rate 18.0 breaths per minute, mean arterial pressure 124.0 mmHg, "
        "pulse 65.0 bpm."
    )
    assert clinical_sentence({}, "pe") == ""


def test_pe_negative_chronic_subsegmental_and_article():
    negative = {"age": 81, "gender": "male", "pe_positive": "false", "pulse": 70.25}
    assert clinical_sentence(negative, "pe") == "An 81-year-old male, no pulmonary embolism, pulse 70.2 bpm."
    chronic = {"age": 18, "gender": "Female", "pe_positive": 1, "pe_acute": 0, "pe_subsegmentalonly": 1}
    assert clinical_sentence(chronic, "pe") == (
        "An 18-year-old female, chronic pulmonary embolism (limited to subsegmental arteries)."
    )


def test_aliases_numbers_and_prefixes():
    row = {"Age": 70.0, "gender": "F", "smoking_status": "Never", "stage": 3.0, "T": 2, "N": "n0", "M": 1}
    assert clinical_sentence(row) == (
        "70 year-old female never smoker lung cancer patient, stage 3, T stage is T2, N stage is "
        "N0, M stage is M1."
    )


def test_pandas_rows_from_a_manifest():
    frame = pd.DataFrame([LUNG_ROW, {**LUNG_ROW, "smoking": None, "stage": None}])
    assert clinical_sentence(frame.iloc[0]) == LUNG_SENTENCE
    assert clinical_sentence(frame.iloc[1]) == (
        "64 year-old male lung cancer patient, T stage is T4, N stage is N1, M stage is M0."
    )
    _, cohort = build_cohort_table(3, 0)
    for _, row in cohort.iterrows():
        sentence = clinical_sentence(row)
        assert f"{row['age']} year-old {row['sex']} {row['smoking']} smoker" in sentence
        assert f"T stage is {row['t_stage']}" in sentence


def test_is_missing():
    assert all(map(is_missing, [None, math.nan, pd.NA, pd.NaT, "", " NaN "]))
    assert not any(map(is_missing, [0, "0", "female", False, [1, 2]]))


def test_unknown_template_is_a_clear_error():
    with pytest.raises(ClinicalTemplateError, match=r"unknown clinical template 'colon'.*'lung'.*'pe'"):
        clinical_sentence(LUNG_ROW, template="colon")
    with pytest.raises(ClinicalTemplateError, match=r"clinical template file .*nope\.yaml does not exist"):
        clinical_sentence(LUNG_ROW, template="nope.yaml")


def test_bad_values_name_the_row_column_and_expectation():
    with pytest.raises(
        ClinicalTemplateError,
        match=r"lung\.yaml: row syn7, column 'sex' \(field 'sex'\): expected one of male, female",
    ):
        clinical_sentence({**LUNG_ROW, "scan_id": "syn7", "sex": "X"})
    with pytest.raises(
        ClinicalTemplateError, match=r"column 'age' \(field 'age'\): expected a number, got 'old'"
    ):
        clinical_sentence({**LUNG_ROW, "age": "old"})
    with pytest.raises(ClinicalTemplateError, match=r"column 'pe_acute'.*expected a yes/no flag"):
        clinical_sentence({**PE_ROW, "pe_acute": "maybe"}, "pe")


def test_malformed_template_files_are_rejected(tmp_path):
    unknown_field = tmp_path / "a.yaml"
    unknown_field.write_text("fields:\n  age: {columns: [age], format: int}\nclauses:\n  - 'aged {years}'\n")
    with pytest.raises(ClinicalTemplateError, match=r"a\.yaml: clause 'aged \{years\}' names field 'years'"):
        clinical_sentence({"age": 3}, unknown_field)
    no_clauses = tmp_path / "b.yaml"
    no_clauses.write_text("fields: {}\n")
    with pytest.raises(ClinicalTemplateError, match=r"b\.yaml: expected a mapping with 'fields'.*'clauses'"):
        clinical_sentence({}, no_clauses)
    bad_format = tmp_path / "c.yaml"
    bad_format.write_text("fields:\n  age: {columns: [age], format: roman}\nclauses: ['{age}']\n")
    with pytest.raises(ClinicalTemplateError, match=r"field 'age': format must be one of"):
        clinical_sentence({"age": 3}, bad_format)
    wordless_flag = tmp_path / "d.yaml"
    wordless_flag.write_text("fields:\n  pe: {columns: [pe], format: flag}\nclauses: ['{pe}']\n")
    with pytest.raises(
        ClinicalTemplateError, match=r"flag field 'pe' is written in a clause, so it needs 'words'"
    ):
        clinical_sentence({"pe": 1}, wordless_flag)


# INSPECT's labels file spells the PE fields pe_positive_nlp / pe_acute / pe_subsegmentalonly, as TRUE/FALSE.
INSPECT_ROW = {
    "impression_id": "101",
    "pe_positive_nlp": "TRUE",
    "pe_acute": "TRUE",
    "pe_subsegmentalonly": "FALSE",
    "age": 61,
    "sex": "F",
    "temperature": 98.6,
    "respiratory_rate": 18,
    "mean_arterial_pressure": 124,
    "pulse": 65,
}


@pytest.mark.parametrize(
    ("positive", "acute", "subsegmental"),
    [("TRUE", "TRUE", "FALSE"), ("True", "True", "False"), (1, 1, 0), (1.0, 1.0, 0.0), (True, True, False)],
)
def test_inspect_label_names_and_values_give_the_pe_clause(positive, acute, subsegmental):
    row = {**INSPECT_ROW, "pe_positive_nlp": positive, "pe_acute": acute, "pe_subsegmentalonly": subsegmental}
    assert clinical_sentence(row, "pe") == PE_SENTENCE


def test_inspect_negative_and_omop_gender_concept():
    row = {
        "pe_positive_nlp": "FALSE",
        "pe_acute": "FALSE",
        "pe_subsegmentalonly": "FALSE",
        "age": 70.0,
        "gender_concept_id": 8507,
        "gender": 8507,
    }
    assert clinical_sentence(row, "pe") == "A 70-year-old male, no pulmonary embolism."
    assert clinical_sentence({"gender": "8532", "pe_positive_nlp": "TRUE"}, "pe") == (
        "A female, pulmonary embolism."
    )


def test_chest_ct_template_for_a_general_chest_cohort():
    assert "chest_ct" in available_templates()
    assert (
        clinical_sentence({"age": 36.0, "sex": "male"}, "chest_ct")
        == "A 36-year-old male patient undergoing chest CT."
    )
    assert clinical_sentence({"age": 81, "PatientSex": "F"}, "chest_ct") == (
        "An 81-year-old female patient undergoing chest CT."
    )
    assert clinical_sentence({"age": math.nan, "sex": None}, "chest_ct") == "A patient undergoing chest CT."


SECRET = "SECRET-REPORT-TEXT: 4 cm spiculated mass"


def _pe_rows(n_without_vitals, n=10):
    rows = []
    for i in range(n):
        row = {**INSPECT_ROW, "scan_id": f"s{i}", "report": SECRET}
        if i < n_without_vitals:
            row = {k: v for k, v in row.items() if k not in ("temperature", "pulse")}
        rows.append(row)
    return rows


def test_missing_field_fractions_count_only_rows_that_need_the_field():
    rows = _pe_rows(3) + [{"scan_id": "neg", "pe_positive_nlp": "FALSE", "age": 50, "sex": "m"}]
    fractions, count = missing_field_fractions(rows, "pe")
    assert count == 11
    assert fractions["temperature"] == pytest.approx(4 / 11) and fractions["pulse"] == pytest.approx(4 / 11)
    assert fractions["respiratory_rate"] == pytest.approx(1 / 11) and fractions["age"] == 0.0
    # pe_acute is needed only where pe_positive is true: the negative row does not count.
    assert fractions["pe_acute"] == 0.0 and fractions["pe_positive"] == 0.0


def test_missing_fields_warning_names_fields_and_fraction_never_text():
    with pytest.warns(MissingClinicalFieldsWarning) as caught:
        over = warn_missing_fields(_pe_rows(3), "pe", max_fraction=0.2, where="cohort/manifest.csv")
    assert over == {"temperature": pytest.approx(0.3), "pulse": pytest.approx(0.3)}
    assert len(caught) == 1
    message = str(caught[0].message)
    assert message.startswith(
        "cohort/manifest.csv: clinical template pe.yaml: 2 field(s) missing in more than 20%"
    )
    assert "temperature 30% (columns temperature, temperature_f, Temperature)" in message
    assert "pulse 30% (columns pulse, heart_rate, Pulse)" in message
    assert "of the 10 rows" in message
    assert SECRET not in message and "spiculated" not in message and "98.6" not in message


def test_missing_fields_threshold_is_configurable_and_checked():
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert warn_missing_fields(_pe_rows(3), "pe", max_fraction=0.3) == {}  # 30% is not more than 30%
        assert warn_missing_fields(_pe_rows(0), "pe", max_fraction=0.0) == {}
    with pytest.warns(MissingClinicalFieldsWarning, match=r"more than 0%"):
        warn_missing_fields(_pe_rows(1), "pe", max_fraction=0.0)
    with pytest.raises(
        ClinicalTemplateError,
        match=r"data\.clinical_missing_warn: expected a fraction between "
        r"0 and 1, got 1\.5",
    ):
        warn_missing_fields([], "pe", max_fraction=1.5, option="data.clinical_missing_warn")


def test_sentence_function_warns_once_for_a_run():
    rows = _pe_rows(10)
    with pytest.warns(MissingClinicalFieldsWarning) as caught:
        sentence = sentence_function(rows, "pe", max_missing_fraction=0.5, where="data.manifest m.csv")
        sentences = [sentence(row) for row in rows]
    assert len(caught) == 1 and "temperature 100%" in str(caught[0].message)
    assert sentences[0] == (
        "A 61-year-old female, acute pulmonary embolism (not limited to subsegmental "
        "arteries), respiratory rate 18.0 breaths per minute, mean arterial pressure 124.0 mmHg."
    )


def test_lung_template_on_a_chest_cohort_warns():
    rows = [{"scan_id": f"c{i}", "age": 40 + i, "sex": "F"} for i in range(4)]
    with pytest.warns(
        MissingClinicalFieldsWarning, match=r"lung\.yaml: 5 field\(s\) missing .* smoking 100%"
    ):
        warn_missing_fields(rows, "lung")


def _chest_cohort(root, splits=("test",) * 5):
    """A CT-RATE-like manifest (age and sex only, report text SECRET) and a feature cache of zero tokens."""
    import json

    import torch
    from conftest import TINY_IMAGE_DIM, TINY_IMAGE_TOKENS
    from safetensors.torch import save_file

    rows = [
        {
            "patient_id": f"p{i}",
            "scan_id": f"s{i}",
            "image": "x.nii.gz",
            "report": SECRET,
            "time": 10.0 + i,
            "event": i % 2,
            "split": split,
            "age": 50 + i,
            "sex": "F",
        }
        for i, split in enumerate(splits)
    ]
    pd.DataFrame(rows).to_csv(root / "manifest.csv", index=False)
    (root / "cache").mkdir()
    key = {
        "encoder": "test",
        "token_mode": "mean_depth",
        "checkpoint_sha256": "random-init:0",
        "preprocess_hash": "test",
        "dtype": "float32",
    }
    tokens = {row["scan_id"]: torch.zeros(TINY_IMAGE_TOKENS, TINY_IMAGE_DIM) for row in rows}
    save_file(tokens, str(root / "cache" / "shard-00000.safetensors"), metadata=key)
    index = {
        s: {"shard": "shard-00000.safetensors", "shape": list(t.shape), **key} for s, t in tokens.items()
    }
    (root / "cache" / "index.json").write_text(json.dumps({"version": 1, "scans": index}))
    return rows


def test_training_data_warns_once_per_run_with_the_configured_threshold(tmp_path):
    import json
    import warnings

    from vlsurv.prompts import load_questions
    from vlsurv.training.config import DataConfig, TrainConfig
    from vlsurv.training.setup import load_data

    rows = _chest_cohort(tmp_path, splits=("train", "train", "train", "val", "test"))
    question = load_questions("lung")[0]
    (tmp_path / "vqa.jsonl").write_text(
        "".join(
            json.dumps(
                {
                    "scan_id": r["scan_id"],
                    "question_id": question.id,
                    "question": question.text,
                    "answer": "None.",
                }
            )
            + "\n"
            for r in rows
        )
    )
    data = DataConfig(
        manifest=str(tmp_path / "manifest.csv"),
        vqa=str(tmp_path / "vqa.jsonl"),
        cache=str(tmp_path / "cache"),
    )
    with pytest.warns(MissingClinicalFieldsWarning) as caught:
        run = load_data(TrainConfig(stage=1, data=data), processor=None)
    assert len(caught) == 1  # once, though 4 scans x (train + val) get a sentence
    message = str(caught[0].message)
    assert message.startswith(f"data.manifest {tmp_path / 'manifest.csv'}: clinical template lung.yaml")
    assert "of the 4 rows" in message and "smoking 100%" in message and SECRET not in message
    assert run.train.samples[0].clinical == "50 year-old female lung cancer patient."
    with warnings.catch_warnings():
        warnings.simplefilter("error", MissingClinicalFieldsWarning)
        load_data(
            TrainConfig(stage=1, data=DataConfig(**{**data.__dict__, "clinical_missing_warn": 1.0})), None
        )


def test_predict_warns_once_per_run_about_missing_template_fields(tmp_path, tiny_model_config):
    """A CT-RATE-like manifest (age and sex only) through predict with the default lung template."""
    import warnings

    from vlsurv.model import VisionLanguageSurvivalModel
    from vlsurv.predict import PredictConfig, predict

    _chest_cohort(tmp_path)
    config = PredictConfig(
        model="unused",
        manifest=str(tmp_path / "manifest.csv"),
        cache=str(tmp_path / "cache"),
        out=str(tmp_path / "out"),
        generate=False,
        batch_scans=2,
        device="cpu",
    )
    model = VisionLanguageSurvivalModel(tiny_model_config)
    with pytest.warns(MissingClinicalFieldsWarning) as caught:
        predict(config, model=model, progress=False)
    ours = [w for w in caught if w.category is MissingClinicalFieldsWarning]
    assert len(ours) == 1  # once for the run, not once per batch of 2 scans
    message = str(ours[0].message)
    assert message.startswith(
        f"manifest {tmp_path / 'manifest.csv'}: clinical template lung.yaml: 5 field(s)"
    )
    assert "smoking 100%" in message and "of the 5 rows" in message and SECRET not in message
    with warnings.catch_warnings():
        warnings.simplefilter("error", MissingClinicalFieldsWarning)
        predict(
            PredictConfig(**{**config.__dict__, "out": str(tmp_path / "out2"), "clinical_missing_warn": 1.0}),
            model=model,
            progress=False,
        )


def test_run_thresholds_are_checked_where_they_are_configured():
    from vlsurv.config import ConfigError
    from vlsurv.predict import PredictConfig
    from vlsurv.training.config import DataConfig, TrainConfig

    assert TrainConfig().data.clinical_missing_warn == 0.2 and PredictConfig().clinical_missing_warn == 0.2
    with pytest.raises(
        ConfigError, match=r"^data\.clinical_missing_warn: expected a fraction in \[0, 1\], got 1\.5"
    ):
        TrainConfig(data=DataConfig(clinical_missing_warn=1.5))
    with pytest.raises(
        ConfigError, match=r"^clinical_missing_warn: expected a fraction in \[0, 1\], got -0\.1"
    ):
        PredictConfig(clinical_missing_warn=-0.1)


def test_a_template_that_is_not_valid_yaml_names_its_file_and_line(tmp_path):
    path = tmp_path / "broken.yaml"
    path.write_text("fields:\n  age: {columns: [age], format: number\nclauses: []\n")
    with pytest.raises(
        ClinicalTemplateError, match=r"broken\.yaml line 3: not valid YAML \(expected ',' or '}'"
    ):
        clinical_sentence(LUNG_ROW, template=path)
