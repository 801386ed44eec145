"""Clinical sentences from the template files in prompts/clinical/."""

from __future__ import annotations

import math

import pandas as pd
import pytest

from vlsurv.data.clinical import ClinicalTemplateError, clinical_sentence, is_missing
from vlsurv.data.synthetic import build_cohort_table

LUNG_ROW = {"age": 64, "sex": "male", "smoking": "former", "stage": 1, "t_stage": "T4", "n_stage": "N1",
            "m_stage": "M0"}
PE_ROW = {"age": 61, "gender": "F", "pe_positive": 1, "pe_acute": True, "pe_subsegmentalonly": 0,
          "temperature": 98.6, "respiratory_rate": 18, "mean_arterial_pressure": 124, "pulse": 65}
LUNG_SENTENCE = "64 year-old male former smoker lung cancer patient, stage 1, T stage is T4, N stage is N1, M stage is M0."
PE_SENTENCE = ("A 61-year-old female, acute pulmonary embolism (not limited to subsegmental arteries), temperature "
               "98.6 F, respiratory rate 18.0 breaths per minute, mean arterial pressure 124.0 mmHg, pulse 65.0 bpm.")


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
        "A 61-year-old female, pulmonary embolism (not limited to subsegmental arteries), respiratory rate 18.0 "
        "breaths per minute, mean arterial pressure 124.0 mmHg.")
    row = {**PE_ROW, "pe_positive": None, "age": None, "gender": None}
    assert clinical_sentence(row, "pe") == (
        "Temperature 98.6 F, respiratory rate 18.0 breaths per minute, mean arterial pressure 124.0 mmHg, "
        "pulse 65.0 bpm.")
    assert clinical_sentence({}, "pe") == ""


def test_pe_negative_chronic_subsegmental_and_article():
    negative = {"age": 81, "gender": "male", "pe_positive": "false", "pulse": 70.25}
    assert clinical_sentence(negative, "pe") == "An 81-year-old male, no pulmonary embolism, pulse 70.2 bpm."
    chronic = {"age": 18, "gender": "Female", "pe_positive": 1, "pe_acute": 0, "pe_subsegmentalonly": 1}
    assert clinical_sentence(chronic, "pe") == (
        "An 18-year-old female, chronic pulmonary embolism (limited to subsegmental arteries).")


def test_aliases_numbers_and_prefixes():
    row = {"Age": 70.0, "gender": "F", "smoking_status": "Never", "stage": 3.0, "T": 2, "N": "n0", "M": 1}
    assert clinical_sentence(row) == (
        "70 year-old female never smoker lung cancer patient, stage 3, T stage is T2, N stage is N0, M stage is M1.")


def test_pandas_rows_from_a_manifest():
    frame = pd.DataFrame([LUNG_ROW, {**LUNG_ROW, "smoking": None, "stage": None}])
    assert clinical_sentence(frame.iloc[0]) == LUNG_SENTENCE
    assert clinical_sentence(frame.iloc[1]) == (
        "64 year-old male lung cancer patient, T stage is T4, N stage is N1, M stage is M0.")
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
    with pytest.raises(ClinicalTemplateError,
                       match=r"lung\.yaml: row syn7, column 'sex' \(field 'sex'\): expected one of male, female"):
        clinical_sentence({**LUNG_ROW, "scan_id": "syn7", "sex": "X"})
    with pytest.raises(ClinicalTemplateError, match=r"column 'age' \(field 'age'\): expected a number, got 'old'"):
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
    with pytest.raises(ClinicalTemplateError, match=r"flag field 'pe' is written in a clause, so it needs 'words'"):
        clinical_sentence({"pe": 1}, wordless_flag)
