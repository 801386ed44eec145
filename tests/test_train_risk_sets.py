"""``loss.risk_set``: the window risk set gives the gradient of one big batch; the memory joins a FIFO of
rows.

- memory: the Cox term over (micro-batch + memory) equals vlsurv's and torchsurv's Cox loss on the
  concatenated rows (on whas500 times and events), gradient flows through the micro-batch only, the FIFO keeps
  the last k;
- window (GradCache): with LoRA dropout on, the cached-gradient backward equals the backward of the window's
  loss with every micro-batch's graph held (same RNG); a training step with ``grad_accum`` 4 x batch 3 and the
  window risk set has the gradient of one step with batch 12 (1e-5), where the micro-batch risk set does not.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import CUTS, build_model, build_tiny_inputs, global_batch
from sksurv.datasets import load_whas500

from vlsurv import losses
from vlsurv.model import VisionLanguageSurvivalModel
from vlsurv.model.survival import DeepHitCuts
from vlsurv.training.config import LossConfig, load_train_config
from vlsurv.training.loop import Trainer
from vlsurv.training.objective import SurvivalRows, local_rows, survival_part, survival_terms, token_nll
from vlsurv.training.risk_sets import RiskMemory, cache_window, set_rng_state, window_step_loss

ROOT = Path(__file__).resolve().parents[1]


def whas500_rows(start: int, stop: int, d: int = 4) -> SurvivalRows:
    _, y = load_whas500()
    time = torch.tensor(y["lenfol"][start:stop].astype("float32"))
    event = torch.tensor(y["fstat"][start:stop].astype("int64"))
    generator = torch.Generator().manual_seed(start)
    n = stop - start
    return SurvivalRows(
        time,
        event,
        torch.randn(n, generator=generator),
        torch.randn(n, d, generator=generator),
        torch.randn(n, d, generator=generator),
    )


@pytest.mark.filterwarnings("ignore:Ties in `time` detected:UserWarning")  # torchsurv warns on any tie
def test_memory_joins_the_cox_risk_set_as_constants():
    from torchsurv.loss.cox import neg_partial_log_likelihood

    current = whas500_rows(0, 12)
    current.head.requires_grad_(True)
    memory = RiskMemory(capacity=3)
    for start in range(12, 72, 12):  # five micro-batches pushed, the last three kept
        memory.push(whas500_rows(start, start + 12))
    remembered = memory.rows()
    assert remembered.time.shape == (36,) and torch.equal(remembered.time, whas500_rows(36, 72).time)

    terms = survival_terms(current, LossConfig(ties="efron"), remembered)
    log_risk = torch.cat([current.head, remembered.head])
    time, event = torch.cat([current.time, remembered.time]), torch.cat([current.event, remembered.event])
    direct = losses.cox_loss(log_risk, time, event, ties="efron")
    torch.testing.assert_close(terms["surv"], direct, rtol=0, atol=1e-6)
    reference = neg_partial_log_likelihood(
        log_risk.detach().double().unsqueeze(1),
        event.bool(),
        time.double(),
        ties_method="efron",
        reduction="sum",
    ) / int(event.sum())
    assert float(terms["surv"].detach()) == pytest.approx(float(reference), rel=1e-5)
    alone = survival_terms(current, LossConfig(ties="efron"))["surv"]
    assert float(terms["surv"].detach()) != pytest.approx(float(alone.detach()))
    disp = losses.dispersion_loss_continuous(torch.cat([current.z_surv, remembered.z_surv]), time, event)
    torch.testing.assert_close(terms["disp"], disp)
    torch.testing.assert_close(terms["align"], losses.alignment_loss(current.z_surv, current.z_pooled))
    terms["surv"].backward()
    assert current.head.grad.abs().sum() > 0 and remembered.head.grad is None


def test_a_deephit_batch_without_its_labels_is_named():
    from vlsurv.model.survival import SurvivalConfigError, SurvivalOutput
    from vlsurv.model.vlm import VLMOutput

    survival = SurvivalOutput(z_surv=torch.zeros(2, 4), logits=torch.zeros(2, len(CUTS) + 1))
    output = VLMOutput(
        lm_loss=None, logits=torch.zeros(2, 3, 5), z_pooled=torch.zeros(2, 4), survival=survival
    )
    batch = {"time": torch.tensor([50.0, 800.0]), "event": torch.tensor([1, 0])}
    with pytest.raises(
        SurvivalConfigError,
        match=r"DeepHit step: the batch has no \['bin_index', 'binned_event', "
        r"'censored_credit'\]; expected .*SampleDataset.set_deephit_cuts\(cuts\)",
    ):
        local_rows(output, batch)
    labels = DeepHitCuts(CUTS).labels(batch["time"], batch["event"])
    batch.update(
        bin_index=labels.bin_index, binned_event=labels.event, censored_credit=labels.censored_credit
    )
    assert local_rows(output, batch).bin_index.tolist() == [0, 2]


def forward_of(model):
    def forward(batch: dict):
        return model(
            input_ids=batch["input_ids"],
            attention_mask=batch["attention_mask"],
            image_tokens=batch["image_tokens"],
            pool_mask=batch["attention_mask"],
        )

    return forward


@pytest.mark.parametrize("head", ["deepsurv", "deephit"])
def test_window_backward_equals_holding_every_graph_with_dropout(tiny_decoder_dir, head):
    config = LossConfig(deephit_ranking_weight=0.5)
    model = build_model(str(tiny_decoder_dir), head, lora_dropout=0.3).train()
    assert any(isinstance(m, torch.nn.Dropout) and m.p > 0 for m in model.modules())
    batches = [
        global_batch(model.processor, rows, model.deephit_cuts) for rows in ([0, 1, 2], [3, 4], [5, 6])
    ]
    forward = forward_of(model)

    torch.manual_seed(5)  # reference: the window's loss with the three graphs held, same RNG draws in order
    outputs = [forward(batch) for batch in batches]
    nll = [token_nll(output.logits, batch["labels"]) for output, batch in zip(outputs, batches)]
    lm = sum(total for total, _ in nll) / sum(count for _, count in nll)
    window = SurvivalRows.cat([local_rows(output, batch) for output, batch in zip(outputs, batches)])
    (lm + survival_part(survival_terms(window, config), config)).backward()
    expected = {name: p.grad.clone() for name, p in model.named_parameters() if p.requires_grad}
    model.zero_grad()

    torch.manual_seed(5)
    cache = cache_window(forward, batches, config)
    for index, batch in enumerate(batches):
        set_rng_state(cache.rng_states[index])
        window_step_loss(forward(batch), batch, cache, index).to_backpropagate.backward()
    assert cache.parts["lm"] == pytest.approx(float(lm.detach()), rel=1e-6)
    for name, p in model.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(p.grad, expected[name], atol=1e-5, rtol=1e-4, msg=name)


@pytest.fixture(scope="module")
def stage2_inputs(tmp_path_factory, tiny_decoder_dir) -> tuple[dict, Path]:
    """The tiny cohort and a stage-1 folder (an untrained projector and LoRA saved with save_pretrained)."""
    root = tmp_path_factory.mktemp("risk_sets")
    inputs = build_tiny_inputs(root / "inputs")
    config = load_train_config(
        ROOT / "configs/tiny/stage1.yaml",
        [f"model.decoder_path={tiny_decoder_dir}", "model.projector_input_norm=none"],
    )
    torch.manual_seed(0)
    stage1 = VisionLanguageSurvivalModel(config.model).save_pretrained(root / "stage1")
    return inputs, Path(stage1)


def first_step_gradients(inputs: dict, stage1: Path, decoder: Path, out: Path, *overrides: str) -> dict:
    config = load_train_config(
        ROOT / "configs/tiny/stage2_deepsurv.yaml",
        [
            f"data.manifest={inputs['manifest']}",
            f"data.vqa={inputs['vqa']}",
            f"data.cache={inputs['cache']}",
            f"model.decoder_path={decoder}",
            f"data.stage1_dir={stage1}",
            f"output_dir={out}",
            "tracker=none",
            "progress=false",
            "optim.max_steps=1",
            "optim.warmup_steps=0",
            "optim.max_grad_norm=0",
            "eval.sample_answers=0",
            "checkpoint.every_n_steps=0",
            "checkpoint.keep_best=false",
            "model.projector_input_norm=none",
            *overrides,
        ],
    )
    trainer = Trainer(config)
    captured = {}

    def capture(optimizer, args, kwargs):
        captured.update(
            {name: p.grad.clone() for name, p in trainer.model.named_parameters() if p.grad is not None}
        )

    trainer.optimizer.optimizer.register_step_pre_hook(capture)
    trainer.fit()
    return captured


@pytest.mark.slow
def test_window_step_has_the_gradient_of_one_batch_of_the_window_size(
    stage2_inputs, tiny_decoder_dir, tmp_path
):
    inputs, stage1 = stage2_inputs
    big = first_step_gradients(
        inputs, stage1, tiny_decoder_dir, tmp_path / "big", "optim.batch_size=12", "optim.grad_accum=1"
    )
    window = first_step_gradients(
        inputs,
        stage1,
        tiny_decoder_dir,
        tmp_path / "window",
        "optim.batch_size=3",
        "optim.grad_accum=4",
        "loss.risk_set=window",
    )
    micro = first_step_gradients(
        inputs,
        stage1,
        tiny_decoder_dir,
        tmp_path / "micro",
        "optim.batch_size=3",
        "optim.grad_accum=4",
        "loss.risk_set=micro_batch",
    )
    assert big.keys() == window.keys() == micro.keys()
    assert any(name.startswith("survival_branch.") for name in big)
    for name, grad in big.items():
        torch.testing.assert_close(window[name], grad, atol=1e-5, rtol=1e-4, msg=name)
    head = "survival_branch.head.weight"
    assert (micro[head] - big[head]).abs().max() > 1e-3 * big[head].abs().max()
