"""The training loop of both stages, run by ``accelerate launch scripts/train.py`` and ``vlsurv train``.

One micro-batch = this process's slice of one global batch of the ``BatchPlan``; ``optim.grad_accum``
micro-batches make an optimizer step (``accelerator.accumulate``; an accumulation may span an epoch boundary).
After each step: log the loss components and learning rates; validate every ``eval.every_n_steps`` steps, at
the end of each epoch and at the end of the run; save a checkpoint every ``checkpoint.every_n_steps`` steps
and whenever validation finds a new best. The run ends after ``total_steps`` steps with ``save_pretrained``
into ``<output_dir>/final`` (what predict loads): the best checkpoint's weights when ``checkpoint.keep_best``
and one has a metric, else the last step's; ``final/selection.json`` says which step and metric (and the
scoring settings predict takes as defaults).

Run directory: ``config.yaml`` (resolved), ``checkpoints/``, ``train_log.jsonl`` (one line per optimizer
step), ``validation.jsonl`` (one line per validation, with the running count of answers cut to the model's
length caps), ``samples.jsonl`` (generated validation answers with scan and question ids), tracker logs
(``tensorboard/``), ``final/``.
"""

from __future__ import annotations

import os
import shutil
from collections import defaultdict
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import GradientAccumulationPlugin, ProjectConfiguration, send_to_device, set_seed

from vlsurv.config import ConfigError, save_config, to_dict
from vlsurv.encoders.provenance import write_provenance
from vlsurv.jsonl import to_line
from vlsurv.progress import progress_bar
from vlsurv.training.answer_status import answer_weights
from vlsurv.training.checkpoints import (
    CheckpointManager,
    keep_changing_weights,
    read_state,
    save_final,
    write_selection,
)
from vlsurv.training.config import TrainConfig
from vlsurv.training.objective import step_loss
from vlsurv.training.risk_sets import RiskMemory, WindowCache, cache_window, set_rng_state, window_step_loss
from vlsurv.training.sampling import BatchPlan
from vlsurv.training.setup import (
    build_model,
    build_optimizer,
    build_scheduler,
    deephit_cuts,
    fit_input_standardizer,
    fit_lobe_guidance,
    flat_hparams,
    image_encoder_record,
    load_data,
    total_steps,
    warmup_steps,
)
from vlsurv.training.status_calibration import fit_status_bias
from vlsurv.training.validation import DecoderMemo, ValidationResult, scoring_options, validate

FINAL_DIR = "final"
TRACKER_PROJECT = "tensorboard"


def make_accelerator(config: TrainConfig) -> Accelerator:
    """An Accelerator with the run's accumulation, precision and tracker; launcher settings fill in the rest.

    A multi-process launch on a machine without CUDA (``accelerate launch --multi_gpu --num_processes N``)
    runs N CPU processes over gloo.
    """
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    return Accelerator(
        cpu=launched > 1 and not torch.cuda.is_available(),
        gradient_accumulation_plugin=GradientAccumulationPlugin(
            num_steps=config.optim.grad_accum, sync_with_dataloader=False
        ),
        mixed_precision=config.mixed_precision,
        log_with=None if config.tracker == "none" else config.tracker,
        project_config=ProjectConfiguration(project_dir=config.output_dir),
        step_scheduler_with_optimizer=False,
    )


class Trainer:
    """State of one run; ``fit()`` trains to the end and returns the ``final`` model folder."""

    def __init__(self, config: TrainConfig, accelerator: Accelerator | None = None) -> None:
        self.config = config
        self.accelerator = accelerator or make_accelerator(config)
        self.run_dir = Path(config.output_dir)
        set_seed(config.seed)
        model = build_model(config)
        self.data = load_data(config, model.processor)
        self.image_encoder = image_encoder_record(config, self.data)
        if self.data.covariates is not None:
            model.set_clinical_covariates(self.data.covariates)
        if config.stage == 1:
            fit_input_standardizer(model, self.data)
        guidance = fit_lobe_guidance(model, self.data)
        if guidance is not None:
            self.accelerator.print(f"lobe classifier fitted on the training scans: {guidance}")
        if config.stage == 2 and config.model.survival.head == "deephit":
            cuts = deephit_cuts(config, self.data)
            model.set_deephit_cuts(cuts)
            self.data.train.set_deephit_cuts(cuts)
            if config.model.survival.deephit_init == "marginal":
                marginal = cuts.marginal_log_probabilities(self.data.train_time, self.data.train_event)
                model.survival_branch.start_at_marginal(marginal)
        world = self.accelerator.num_processes
        strata = self.data.train_strata
        if config.loss.answer_balance > 0:
            self.data.train.set_answer_weights(answer_weights(strata, config.loss.answer_balance))
        if config.loss.status_weight != 1.0:
            step, _, _ = model.status_decision()
            self.data.train.set_status_weight(step, config.loss.status_weight)
        self.plan = BatchPlan(
            self.data.train.patients(),
            config.optim.batch_size * world,
            config.sampling,
            config.seed,
            world,
            strata,
        )
        self.total_steps = total_steps(config, self.plan)
        self.warmup_steps = warmup_steps(config, self.total_steps, self.plan.batches_per_epoch())
        self.accelerator.print(
            f"planned optimizer steps: {self.total_steps} ({self.plan.batches_per_epoch()} batches per "
            f"epoch, optim.grad_accum {config.optim.grad_accum}); warmup steps: {self.warmup_steps}; "
            f"schedule: {config.optim.scheduler}"
        )
        optimizer = build_optimizer(model, config)
        # stage 2 with the projector and LoRA frozen: validation's decoder passes give the same outputs
        self.decoder_memo = DecoderMemo() if config.stage == 2 and not model.trains_decoder() else None
        scheduler = build_scheduler(optimizer, config, self.total_steps, self.warmup_steps)
        self.model, self.optimizer, self.scheduler = self.accelerator.prepare(model, optimizer, scheduler)
        self.accelerator.register_save_state_pre_hook(keep_changing_weights(self.model))
        self.checkpoints = CheckpointManager(
            self.run_dir / "checkpoints",
            config.checkpoint.keep_last,
            config.checkpoint.keep_best,
            higher_is_better=config.stage == 2,
        )
        self.step, self.epoch, self.position = 0, 0, 0
        self.best_metric: float | None = None
        self.last_validation: tuple[int, float | None] | None = None
        risk_set = config.loss.risk_set if config.stage == 2 else "micro_batch"
        self.memory = RiskMemory(config.loss.memory_batches) if risk_set == "memory" else None
        self.window_risk_set = risk_set == "window"
        self.window: WindowCache | None = None
        self.window_index = 0

    # --- bookkeeping ---------------------------------------------------------------------------------------
    def start(self, resume: str | None) -> None:
        """Write the resolved config, start the trackers, and load ``resume`` when given."""
        acc = self.accelerator
        earlier = self.earlier_run() if resume is None else []
        if earlier and not self.config.overwrite_output_dir:
            raise ConfigError(
                f"output_dir {self.run_dir} holds an earlier run ({', '.join(earlier)}); give --resume "
                "latest to continue it, overwrite_output_dir=true to start over, or another output_dir"
            )
        if acc.is_main_process:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            if earlier:
                shutil.rmtree(self.checkpoints.root, ignore_errors=True)
                shutil.rmtree(self.run_dir / FINAL_DIR, ignore_errors=True)
            save_config(self.config, self.run_dir / "config.yaml")
            self.checkpoints.remove_temporary()
        acc.wait_for_everyone()
        if self.config.tracker != "none":
            acc.init_trackers(TRACKER_PROJECT, config=flat_hparams(to_dict(self.config)))
        if resume is not None:
            path = self.checkpoints.resolve(resume)
            acc.load_state(str(path), strict=False)
            state = read_state(path)
            self.step, self.epoch, self.position = state["step"], state["epoch"], state["position"]
            acc.print(f"resumed from {path} at step {self.step} (epoch {self.epoch}, batch {self.position})")
        self.best_metric = self.checkpoints.best_metric()

    def earlier_run(self) -> list[str]:
        """What an earlier run left in ``output_dir`` (its checkpoints, its final/); read on every process, so
        that all of them refuse together."""
        found = []
        completed = self.checkpoints.completed()
        if completed:
            found.append(f"checkpoints up to step {completed[-1][0]}")
        if (self.run_dir / FINAL_DIR).exists():
            found.append(f"{FINAL_DIR}/")
        return found

    def is_better(self, metric: float | None) -> bool:
        if metric is None:
            return False
        if self.best_metric is None:
            return True
        return metric > self.best_metric if self.config.stage == 2 else metric < self.best_metric

    def run_validation(self) -> ValidationResult:
        cfg = self.config.eval
        result = validate(
            self.model,
            self.data.val,
            self.accelerator,
            batch_size=cfg.batch_size,
            with_risk=self.config.stage == 2,
            answers=cfg.sample_answers,
            max_new_tokens=cfg.max_new_tokens,
            clinical_scans=cfg.clinical_scans,
            questions=self.config.data.questions,
            memo=self.decoder_memo,
        )
        self.accelerator.log(result.metrics(), step=self.step)
        self.last_validation = (self.step, self.metric_of(result))
        if self.accelerator.is_main_process:
            line = {
                "step": self.step,
                "epochs_completed": self.epoch,
                **result.metrics(),
                "note": result.c_index_note,
                "truncated_answers": self.data.val.processor.truncated_answers,
            }
            with (self.run_dir / "validation.jsonl").open("a") as handle:
                handle.write(to_line(line))
            with (self.run_dir / "samples.jsonl").open("a") as handle:
                for sample in result.samples:
                    handle.write(to_line({"step": self.step, **sample}))
        return result

    def metric_of(self, result: ValidationResult) -> float | None:
        return result.c_index if self.config.stage == 2 else result.lm_loss

    def save_checkpoint(self, metric: float | None) -> None:
        state = {"epoch": self.epoch, "position": self.position, "metric": metric}
        path = self.checkpoints.save(self.accelerator, self.step, state)
        if self.is_better(metric):
            self.best_metric = metric
        self.accelerator.print(f"saved checkpoint {path}", flush=True)

    def log_step(self, sums: dict[str, float], count: int) -> None:
        """Mean loss components of the step's micro-batches and the learning rates: trackers +
        train_log.jsonl."""
        values = {f"train/{name}": value / count for name, value in sums.items()}
        for group in self.optimizer.param_groups:
            values[f"lr/{group['name']}"] = group["lr"]
        self.accelerator.log(values, step=self.step)
        if self.accelerator.is_main_process:
            with (self.run_dir / "train_log.jsonl").open("a") as handle:
                handle.write(to_line({"step": self.step, "epoch": self.epoch, **values}))

    # --- the loop ------------------------------------------------------------------------------------------
    def collate(self, indices: list[int]) -> dict:
        train = self.data.train
        return send_to_device(train.collate([train[i] for i in indices]), self.accelerator.device)

    def forward(self, batch: dict):
        return self.model(
            input_ids=batch["input_ids"],
            attention_mask=batch["attention_mask"],
            image_tokens=batch["image_tokens"],
            pool_mask=self.accelerator.unwrap_model(self.model).pool_mask(batch),
            covariates=batch.get("covariates"),
        )

    def following_batches(self, count: int) -> list[list[int]]:
        """This process's indices of the ``count`` micro-batches after the current one (across epoch ends)."""
        found, epoch, start = [], self.epoch, self.position + 1
        while len(found) < count:
            for _, indices in self.plan.local_batches(epoch, self.accelerator.process_index, start):
                found.append(indices)
                if len(found) == count:
                    break
            epoch, start = epoch + 1, 0
        return found

    def window_loss(self, indices: list[int]):
        """``loss.risk_set=window``: at a window's first micro-batch, cache the window
        (vlsurv.training.risk_sets); then forward this micro-batch from its recorded RNG state and return its
        share."""
        if self.window is None or self.window_index == len(self.window.batches):
            following = self.following_batches(self.config.optim.grad_accum - 1)
            batches = [self.collate(i) for i in [indices, *following]]
            self.window = cache_window(self.forward, batches, self.config.loss)
            self.window_index = 0
        index = self.window_index
        self.window_index += 1
        set_rng_state(self.window.rng_states[index])
        batch = self.window.batches[index]
        return window_step_loss(self.forward(batch), batch, self.window, index)

    def micro_step(self, indices: list[int]) -> dict[str, float]:
        """Forward + backward of one micro-batch (and the optimizer step when the accumulation is
        complete)."""
        acc = self.accelerator
        with acc.accumulate(self.model):
            if self.window_risk_set:
                loss = self.window_loss(indices)
                # accelerate divides by grad_accum; the window's loss is the sum of its micro-batches' shares
                acc.backward(loss.to_backpropagate * self.config.optim.grad_accum)
            else:
                batch = self.collate(indices)
                memory = self.memory.rows() if self.memory is not None else None
                loss = step_loss(self.forward(batch), batch, self.config.stage, self.config.loss, memory)
                if self.memory is not None:
                    self.memory.push(loss.rows)
                acc.backward(loss.to_backpropagate)
            if acc.sync_gradients and self.config.optim.max_grad_norm > 0:
                acc.clip_grad_norm_(self.model.parameters(), self.config.optim.max_grad_norm)
            self.optimizer.step()
            if acc.sync_gradients:
                self.scheduler.step()
            self.optimizer.zero_grad()
        return loss.parts

    def validate_and_checkpoint(self, synced: bool, epoch_end: bool) -> None:
        """After a micro-batch: validate at an epoch end, every ``eval.every_n_steps`` steps and after the
        last step; after an optimizer step, save a checkpoint when due or when validation found a new best."""
        cfg = self.config
        every = cfg.eval.every_n_steps
        last = synced and self.step >= self.total_steps
        result = None
        if epoch_end or last or (synced and every and self.step % every == 0):
            result = self.run_validation()
        if not synced:
            return
        metric = None if result is None else self.metric_of(result)
        every = cfg.checkpoint.every_n_steps
        due = bool(every) and self.step % every == 0
        if due or (cfg.checkpoint.keep_best and self.is_better(metric)):
            self.save_checkpoint(metric)

    def fit(self, resume: str | None = None) -> Path:
        self.start(resume)
        acc = self.accelerator
        cfg = self.config
        progress = progress_bar(
            total=self.total_steps,
            initial=self.step,
            desc=f"stage {cfg.stage}",
            unit="step",
            enabled=cfg.progress and acc.is_local_main_process,
        )
        sums: dict[str, float] = defaultdict(float)
        micro = 0
        n_batches = self.plan.batches_per_epoch()
        while self.step < self.total_steps:
            for position, indices in self.plan.local_batches(self.epoch, acc.process_index, self.position):
                for name, value in self.micro_step(indices).items():
                    sums[name] += value
                micro += 1
                epoch_end = position == n_batches - 1
                synced = acc.sync_gradients
                if synced:
                    self.step += 1
                    progress.update(1)
                    progress.set_postfix(loss=f"{sums['loss'] / micro:.4f}", refresh=False)
                    self.log_step(sums, micro)
                    sums, micro = defaultdict(float), 0
                self.epoch, self.position = (self.epoch + 1, 0) if epoch_end else (self.epoch, position + 1)
                self.validate_and_checkpoint(synced, epoch_end)
                if self.step >= self.total_steps or epoch_end:
                    break
        progress.close()
        return self.finish()

    def select_final(self) -> dict:
        """Load the best checkpoint into the model when ``checkpoint.keep_best`` found one (every process),
        and return the record of what ``final/`` will hold: {selected, step, metric, value, last_step,
        scoring}."""
        name = "val/c_index" if self.config.stage == 2 else "val/lm_loss"
        best = self.checkpoints.best() if self.config.checkpoint.keep_best else None
        if best is not None:
            step, path = best
            if step != self.step:
                self.accelerator.load_state(str(path), strict=False)
            selected, value = "best", self.checkpoints.metric_of(path)
        else:
            step = self.step
            selected = "last"
            value = (
                self.last_validation[1] if self.last_validation and self.last_validation[0] == step else None
            )
        unwrapped = self.accelerator.unwrap_model(self.model)
        return {
            "selected": selected,
            "step": step,
            "metric": name,
            "value": value,
            "last_step": self.step,
            "scoring": scoring_options(unwrapped, self.config.eval.max_new_tokens),
        }

    def finish(self) -> Path:
        """The selected weights (``select_final``) saved into ``<output_dir>/final`` (``save_final``: gathered
        on every process, written by the main one) with ``selection.json``; close the trackers."""
        acc = self.accelerator
        acc.wait_for_everyone()
        selection = self.select_final()
        unwrapped = acc.unwrap_model(self.model)
        if unwrapped.config.opens_with_status and self.config.eval.status_calibration != "none":
            calibration = fit_status_bias(
                unwrapped,
                self.data.val,
                acc,
                self.config.eval.batch_size,
                self.config.eval.status_present_cap,
            )
            selection["status_calibration"] = calibration
            acc.print(f"status thresholds fitted on {calibration['val_scans']} val scans: {calibration}")
        final = save_final(acc, self.model, self.run_dir / FINAL_DIR)
        if acc.is_main_process:
            write_selection(final, selection)
            if self.image_encoder is not None:
                write_provenance(final, self.image_encoder)
            acc.print(
                f"saved the final model to {final}: step {selection['step']} ({selection['selected']}, "
                f"{selection['metric']} {selection['value']}); answers cut to the length caps: "
                f"{self.data.train.processor.truncated_answers}"
            )
        acc.wait_for_everyone()
        acc.end_training()
        return final


def train(config: TrainConfig, resume: str | None = None, accelerator: Accelerator | None = None) -> Path:
    """Train ``config`` (resuming from ``resume``: "latest" or a checkpoint folder); return the final model
    folder."""
    return Trainer(config, accelerator).fit(resume)
