"""Clinical covariates (vlsurv.data.covariates): the encoding fitted on training rows, its standardised rows,
save/load, the survival head's linear term on them checked against lifelines' CoxPH on rossi, and the
errors."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
from lifelines import CoxPHFitter
from lifelines.datasets import load_rossi

from vlsurv.data.clinical import ClinicalTemplateError
from vlsurv.data.covariates import ClinicalCovariates
from vlsurv.losses import cox_loss
from vlsurv.model.survival import SurvivalBranch, SurvivalConfig, SurvivalConfigError

TRAIN = [
    {"scan_id": "a", "age": 60, "smoking": "ex-smoker", "t_stage": "T1", "sex": "male", "stage": 1},
    {"scan_id": "b", "age": 70, "smoking": "never", "t_stage": "T2", "sex": "male", "stage": 2},
    {"scan_id": "c", "age": 80, "smoking": "current", "t_stage": "T4", "sex": "male", "stage": 3},
    {"scan_id": "d", "age": None, "smoking": "former", "t_stage": "T3", "sex": "male", "stage": 4},
]


def test_fit_encodes_numbers_stage_codes_and_levels_and_standardises_with_the_training_rows():
    covariates = ClinicalCovariates.fit(TRAIN, "lung", ["age", "smoking", "t_stage", "sex"])
    # never is the template's first smoking word (the reference); the constant sex is left out
    assert covariates.columns == ["age", "smoking=current", "smoking=former", "t_stage"]
    # the missing age is the training median (70); "active" is a spelling of current; T2 is 2
    row = {"age": None, "smoking": "active", "t_stage": "T2", "sex": "female"}
    assert covariates.design_row(row) == [70.0, 1.0, 0.0, 2.0]
    design = np.array([covariates.design_row(r) for r in TRAIN])
    assert design.tolist() == [[60, 0, 1, 1], [70, 0, 0, 2], [80, 1, 0, 4], [70, 0, 1, 3]]
    expected = (design - design.mean(0)) / design.std(0)
    encoded = torch.stack([covariates.encode(r) for r in TRAIN])
    assert encoded.dtype == torch.float32
    np.testing.assert_allclose(encoded.numpy(), expected, rtol=1e-6)
    # a level never seen in training is all 0 (the reference's columns), a missing smoking too
    unseen = covariates.design_row({"age": 65, "smoking": None, "t_stage": "T9"})
    assert unseen == [65.0, 0.0, 0.0, 9.0]
    assert list(covariates.by_scan(TRAIN)) == ["a", "b", "c", "d"]


def test_flag_spellings_are_one_level():
    rows = [{"pe_acute": value, "age": 50 + i} for i, value in enumerate(["TRUE", "True", "no", "yes"])]
    covariates = ClinicalCovariates.fit(rows, "pe", ["pe_acute"])
    # one level per truth value; the reference is the more frequent one ("true", 3 of 4)
    assert covariates.columns == ["pe_acute=false"]
    assert [covariates.design_row(r) for r in rows] == [[0.0], [0.0], [1.0], [0.0]]


def test_save_and_load_give_the_same_encoding(tmp_path):
    covariates = ClinicalCovariates.fit(TRAIN, "lung", ["age", "smoking", "stage"])
    covariates.save(tmp_path)
    loaded = ClinicalCovariates.load(tmp_path)
    assert loaded.columns == covariates.columns and loaded.fields == ["age", "smoking", "stage"]
    for row in TRAIN:
        assert torch.equal(loaded.encode(row), covariates.encode(row))


def test_bad_fields_and_files_are_named(tmp_path):
    with pytest.raises(
        ClinicalTemplateError, match=r"field 'weight' is not in the clinical template lung.yaml"
    ):
        ClinicalCovariates.fit(TRAIN, "lung", ["age", "weight"])
    with pytest.raises(
        ClinicalTemplateError, match=r"field 'n_stage' .* is missing in all 4 of the train rows"
    ):
        ClinicalCovariates.fit(TRAIN, "lung", ["n_stage"], where="the train rows")
    with pytest.raises(
        ClinicalTemplateError, match=r"none of the fields \['sex'\] .* varies over the 4 rows"
    ):
        ClinicalCovariates.fit(TRAIN, "lung", ["sex"])
    (tmp_path / ClinicalCovariates.FILE_NAME).write_text("{not json")
    with pytest.raises(ClinicalTemplateError, match=r"clinical_covariates.json: cannot read the clinical"):
        ClinicalCovariates.load(tmp_path)


@pytest.mark.parametrize("head", ["deepsurv", "deephit"])
def test_the_covariate_term_starts_at_zero_and_is_required_once_added(head):
    torch.manual_seed(0)
    branch = SurvivalBranch(8, SurvivalConfig(head=head, num_bins=4, covariates=["age", "stage"]))
    z = torch.randn(5, 8)
    output = "log_risk" if head == "deepsurv" else "logits"
    before = getattr(branch(z), output)
    branch.add_covariates(3)
    x = torch.randn(5, 3)
    assert torch.equal(getattr(branch(z, x), output), before)
    with torch.no_grad():
        branch.covariate_head.weight.fill_(0.5)
    moved = (getattr(branch(z, x), output) - before).reshape(5, -1)  # every output moves by 0.5 * sum(x)
    torch.testing.assert_close(moved, (0.5 * x.sum(1, keepdim=True)).expand_as(moved))
    with pytest.raises(
        SurvivalConfigError, match=r"reads 3 clinical covariate columns .*\['age', 'stage'\].* got none"
    ):
        branch(z)
    with pytest.raises(
        SurvivalConfigError, match=r"expected covariates of shape \(5, 3\), got shape \(5, 2\)"
    ):
        branch(z, torch.zeros(5, 2))
    with pytest.raises(SurvivalConfigError, match="at least one covariate column, got 0"):
        branch.add_covariates(0)


ROSSI_TEMPLATE = """
fields:
  age: {columns: [age], format: int}
  prio: {columns: [prio], format: int}
  fin: {columns: [fin], format: flag}
  race: {columns: [race], format: flag}
  wexp: {columns: [wexp], format: flag}
  mar: {columns: [mar], format: flag}
  paro: {columns: [paro], format: flag}
head: ["{age} years"]
clauses: ["{prio} prior convictions"]
"""


def test_the_head_on_covariates_alone_is_lifelines_cox_model_on_rossi(tmp_path):
    """With a constant z_pooled the branch's log-risk is beta . x + const, so fitting it with the Efron Cox
    loss must give lifelines' CoxPH coefficients on the same standardised covariates."""
    template = tmp_path / "rossi.yaml"
    template.write_text(ROSSI_TEMPLATE)
    rossi = load_rossi()
    rows = rossi.to_dict("records")
    covariates = ClinicalCovariates.fit(rows, template)
    x = torch.stack([covariates.encode(r) for r in rows]).double()
    time = torch.tensor(rossi["week"].to_numpy(), dtype=torch.float64)
    event = torch.tensor(rossi["arrest"].to_numpy(), dtype=torch.long)

    branch = SurvivalBranch(4).double()
    branch.add_covariates(covariates.size)
    branch.requires_grad_(False)
    branch.covariate_head.requires_grad_(True)
    optimizer = torch.optim.LBFGS(
        branch.covariate_head.parameters(), max_iter=200, line_search_fn="strong_wolfe"
    )
    z = torch.zeros(len(rows), 4, dtype=torch.float64)

    def closure():
        optimizer.zero_grad()
        loss = cox_loss(branch(z, x).log_risk, time, event, ties="efron")
        loss.backward()
        return loss

    optimizer.step(closure)
    frame = pd.DataFrame(x.numpy(), columns=covariates.columns).assign(
        week=rossi["week"], arrest=rossi["arrest"]
    )
    reference = CoxPHFitter().fit(frame, "week", "arrest").params_[covariates.columns].to_numpy()
    np.testing.assert_allclose(branch.covariate_head.weight[0].detach().numpy(), reference, atol=1e-4)
    assert covariates.columns == ["age", "prio", "fin", "race", "wexp", "mar", "paro"]
