"""The training loop behind ``compir train``: AdamW, warmup + cosine, gradient clipping, mixed
precision, validation recall every epoch, best / last checkpoints, resume, DDP, a time budget.

A run folder holds ``best.pt`` (best validation score, weights only), ``last.pt`` (latest epoch,
with optimizer state for ``--resume`` unless ``--no-optimizer-state``: 3x best.pt with it) and
``train_log.json`` (options and per-epoch metrics).
"""

from __future__ import annotations

import contextlib
import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from compir.contracts import atomic_write_bytes
from compir.errors import InputError
from compir.train.checkpoint import load_checkpoint, save_checkpoint
from compir.train.config import DEFAULT_MODEL, ModelConfig, configure_model, resolve_model_config
from compir.train.distributed import DistContext, barrier, broadcast_value, cleanup_distributed, setup_distributed
from compir.train.losses import weighted_loss
from compir.train.model import CIRModel, count_parameters
from compir.train.objective import build_data, check_objective, objective_head
from compir.train.optim import build_optimizer, lr_factor, set_lr
from compir.train.options import AMP_MODES, TrainOptions
from compir.train.precision import TRIAL_PLAN, AmpDecision, choose_amp, decide_trial
from compir.train.sources import TrainBatch
from compir.train.towers import tower_kernels
from compir.train.unlabeled_sources import ImageBatch, PairBatch

# After this many steps the run prints its measured throughput and the steps its budget will give.
_THROUGHPUT_REPORT_STEP = 10

__all__ = ["AMP_MODES", "TrainOptions", "TrainResult", "train"]  # the options live in compir.train.options (torch-free)


@dataclass(frozen=True)
class TrainResult:
    out_dir: Path
    best_checkpoint: Path
    last_checkpoint: Path
    best_metrics: dict[str, float]
    last_metrics: dict[str, float]
    steps: int
    epochs: int
    seconds: float
    steps_per_second: float
    cpu_seconds: float  # process CPU time of this run (all threads): load-independent cost
    history: list[dict[str, Any]] = field(default_factory=list)


def train(options: TrainOptions) -> TrainResult:
    """Train a model on ``options.data`` and write the run folder (rank 0)."""
    if options.amp not in AMP_MODES:
        raise InputError(f"--amp must be one of {', '.join(AMP_MODES)}, got {options.amp!r}")
    for name in ("steps", "epochs"):
        value = getattr(options, name)
        if value is not None and value < 1:
            raise InputError(f"--{name} must be >= 1, got {value}")
    if options.minutes is not None and options.minutes <= 0:
        raise InputError(f"--minutes must be positive, got {options.minutes}")
    check_objective(options)
    _check_start(options)
    ctx = setup_distributed(options.device)
    try:
        return _Run(options, ctx).run()
    finally:
        cleanup_distributed(ctx)


class _Run:
    def __init__(self, options: TrainOptions, ctx: DistContext) -> None:
        self.options, self.ctx = options, ctx
        torch.manual_seed(options.seed + ctx.rank)
        resumed = load_checkpoint(options.resume) if options.resume else None
        if resumed is not None:
            self.model = resumed.model.train()
            state = resumed.optimizer_state or {}
            self.step, self.epoch = resumed.step, resumed.epoch
            self.elapsed, self.best_score = float(state.get("elapsed_s", 0.0)), float(state.get("best_score", -1.0))
            self.history: list[dict[str, Any]] = list(state.get("history", []))
        else:
            self.model = _initial_model(options)
            state, self.step, self.epoch, self.elapsed, self.best_score, self.history = {}, 0, 0, 0.0, -1.0, []
        self.losses: list[float] = []  # this process's weighted training loss per step (train_log.json "losses")
        self.model.freeze_towers(image=options.freeze_image, text=options.freeze_text)
        if options.objective == "clip":  # the towers' own embeddings train; a composition head has no part in the loss
            self.model.head.requires_grad_(False)
        self.model.to(ctx.device)
        self.optimizer = build_optimizer(
            self.model, lr=options.lr, weight_decay=options.weight_decay, backbone_lr_scale=options.backbone_lr_scale
        )
        if "optimizer" in state:
            self.optimizer.load_state_dict(state["optimizer"])
        self.amp = choose_amp(options.amp, ctx.device)
        self.amp_dtype = self.amp.dtype
        # Step timings per dtype while a precision trial runs (its first len(TRIAL_PLAN) steps; a resumed run too).
        self._trial: dict[torch.dtype | None, list[float]] | None = {} if self.amp.trial else None
        self._trial_step = 0
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.amp_dtype == torch.float16)
        self.wrapped: torch.nn.Module = (
            DistributedDataParallel(self.model, device_ids=[ctx.device.index] if ctx.device.type == "cuda" else None)
            if ctx.distributed
            else self.model
        )
        self.source, self.validation = build_data(options, self.model, ctx)  # reads and checks every input: nothing written yet
        self.epochs = options.epochs if options.epochs is not None else (None if options.minutes or options.steps else 10)
        self.out_dir = Path(options.out_dir)
        self.last_metrics: dict[str, float] = {}

    # ---- the loop ----------------------------------------------------------------------
    def run(self) -> TrainResult:
        o = self.options
        if self.ctx.is_main:
            trainable = count_parameters(self.model, trainable_only=True)
            print(
                f"compir train: {self.model.config.name} ({count_parameters(self.model) / 1e6:.1f}M parameters, "
                f"{trainable / 1e6:.1f}M trainable) on {self.ctx.device} x{self.ctx.world_size}, "
                f"amp={self.amp.label}, {len(self.source)} steps/epoch, batch {o.batch_size}"
            )
            print(f"backbone: {self.model.describe_backbone()}")
            print(f"precision: {self.amp.reason}")
            if self.amp.warning:
                print(f"warning: {self.amp.warning}")
        start_step, run_started, cpu_started = self.step, time.monotonic(), time.process_time()
        started = run_started - self.elapsed  # a resumed run continues its schedule and budget
        while not self._done(started):
            self._train_epoch(started)
            self.epoch += 1
            self._validate_and_save(started)
        seconds = time.monotonic() - started
        run_seconds = max(1e-9, time.monotonic() - run_started)
        best = self.out_dir / "best.pt"
        return TrainResult(
            out_dir=self.out_dir,
            best_checkpoint=best,
            last_checkpoint=self.out_dir / "last.pt",
            best_metrics=dict(max(self.history, key=lambda h: h["score"])["metrics"]) if self.history else {},
            last_metrics=self.last_metrics,
            steps=self.step,
            epochs=self.epoch,
            seconds=seconds,
            steps_per_second=(self.step - start_step) / run_seconds,
            cpu_seconds=time.process_time() - cpu_started,
            history=list(self.history),
        )

    def _progress(self, started: float) -> float:
        """Share of the run done (0 -> 1): by steps, by time budget, whichever is further."""
        parts = []
        if self.epochs is not None:
            parts.append(self.step / max(1, self.epochs * len(self.source)))
        if self.options.steps is not None:
            parts.append(self.step / self.options.steps)
        if self.options.minutes:
            parts.append(broadcast_value(time.monotonic() - started, self.ctx) / (60.0 * self.options.minutes))
        return max(parts)

    def _done(self, started: float) -> bool:
        return self._progress(started) >= 1.0

    def _train_epoch(self, started: float) -> None:
        self.wrapped.train()
        show = self.options.progress and self.ctx.is_main
        bar = tqdm(total=len(self.source), desc=f"epoch {self.epoch + 1}", unit="step", disable=not show)
        tick = time.monotonic()
        for index, batch in enumerate(self.source.epoch(self.epoch)):
            progress = self._progress(started)
            if progress >= 1.0:
                break
            lr = set_lr(self.optimizer, lr_factor(step=self.step, progress=progress, warmup_steps=self.options.warmup_steps))
            terms = self._timed_step(batch.to(self.ctx.device))
            self.step += 1
            bar.update(1)
            if index % 5 == 0:
                rate = (index + 1) / max(1e-9, time.monotonic() - tick)
                bar.set_postfix({**{k: f"{v:.3f}" for k, v in terms.items()}, "lr": f"{lr:.1e}", "it/s": f"{rate:.2f}"})
            if self.step == _THROUGHPUT_REPORT_STEP and self.ctx.is_main:
                self._report_throughput(time.monotonic() - tick, index + 1, started)
        bar.close()

    def _report_throughput(self, seconds: float, steps: int, started: float) -> None:
        """Print the measured step rate early, and what the time budget will give at that rate."""
        rate = steps / max(1e-9, seconds)
        line = f"throughput: {rate:.2f} steps/s ({seconds / steps:.2f} s/step, amp={self.amp.label})"
        if self.options.minutes:
            left = 60.0 * self.options.minutes - (time.monotonic() - started)
            # Validation takes its share of the budget too; this is the training-only projection.
            projected = self.step + int(rate * left)
            line += f"; about {projected} steps fit the {self.options.minutes:g}-minute budget"
            expected = self.options.expected_steps
            if expected and projected < 0.75 * expected:
                line += (f"\nwarning: this machine trains far fewer steps than the recipe assumes ({projected} of "
                         f"~{expected}): expect lower recall; give more --minutes or use a fixed --steps {expected}")
        tqdm.write(line)

    def _timed_step(self, batch: TrainBatch | PairBatch | ImageBatch) -> dict[str, float]:
        """One step; during a precision trial, in the plan's dtype and timed (then the faster dtype is kept)."""
        if self._trial is None:
            return self._step(batch)
        dtype = TRIAL_PLAN[self._trial_step]
        self.amp_dtype = dtype
        started = time.perf_counter()
        terms = self._step(batch)
        seconds = time.perf_counter() - started
        if dtype in TRIAL_PLAN[: self._trial_step]:  # not this dtype's warm-up step
            self._trial.setdefault(dtype, []).append(seconds)
        self._trial_step += 1
        if self._trial_step == len(TRIAL_PLAN):
            decision = decide_trial(self._trial)
            keep_bf16 = broadcast_value(float(decision.dtype is not None), self.ctx) > 0.5  # every process: rank 0's choice
            if keep_bf16 != (decision.dtype is not None):
                decision = AmpDecision(torch.bfloat16 if keep_bf16 else None, "auto: as rank 0's trial decided")
            self.amp, self.amp_dtype, self._trial = decision, decision.dtype, None
            if self.ctx.is_main:
                tqdm.write(f"precision: {self.amp.reason}")
        return terms

    def _step(self, batch: TrainBatch | PairBatch | ImageBatch) -> dict[str, float]:
        weights = self.model.config.loss_weights
        with tower_kernels(self.model.backbone.visual, self.ctx.device):  # forward and backward
            with _autocast(self.ctx.device, self.amp_dtype):
                terms = batch.losses(self.wrapped)
            loss = weighted_loss(terms, weights)
            self.optimizer.zero_grad(set_to_none=True)
            self.scaler.scale(loss).backward()
        if self.options.grad_clip > 0:
            self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_([p for p in self.model.parameters() if p.requires_grad], self.options.grad_clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.losses.append(float(loss.detach()))
        return {name: float(value.detach()) for name, value in terms.items()}

    def _validate_and_save(self, started: float) -> None:
        if self.ctx.is_main and self.validation is not None:
            result = self.validation(self.model, device=self.ctx.device, progress=self.options.progress)
            self.model.train()
            score, metrics = result.score, result.metrics
            self.last_metrics = dict(metrics)
            self.history.append(
                {"epoch": self.epoch, "step": self.step, "elapsed_s": round(time.monotonic() - started, 1), "score": score,
                 "metrics": dict(metrics), "baselines": result.baselines}
            )
            # A resumed run writing to a new folder starts its own best.pt.
            improved = score > self.best_score or not (self.out_dir / "best.pt").is_file()
            self.best_score = max(score, self.best_score)
            state = {
                "elapsed_s": time.monotonic() - started,
                "best_score": self.best_score, "history": self.history, "options": _jsonable(asdict(self.options)),
            }
            if self.options.optimizer_state:  # AdamW's two moments per weight: last.pt at 3x best.pt
                state["optimizer"] = self.optimizer.state_dict()
            self.out_dir.mkdir(parents=True, exist_ok=True)
            save_checkpoint(self.out_dir / "last.pt", model=self.model, metrics=metrics, step=self.step, epoch=self.epoch,
                            optimizer_state=state)
            if improved:
                save_checkpoint(self.out_dir / "best.pt", model=self.model, metrics=metrics, step=self.step, epoch=self.epoch)
            log = {"objective": self.options.objective, "head": self.model.config.head, "options": state["options"],
                   "history": self.history, "losses": self.losses}
            atomic_write_bytes(self.out_dir / "train_log.json", (json.dumps(log, indent=1) + "\n").encode("utf-8"))
            best_mark = " (best)" if improved else ""
            summary = ", ".join(f"{k} {v:.{3 if k.endswith('loss') else 1}f}" for k, v in metrics.items())
            tqdm.write(f"epoch {self.epoch} step {self.step}: val {summary}{best_mark}")
        barrier(self.ctx)


def _check_start(options: TrainOptions) -> None:
    """--resume, --init and the flags that shape a new model exclude each other where they would conflict."""
    shaping = [flag for flag, value in (("--head", options.head), ("--head-option", options.head_option),
                                        ("--resize-mode", options.resize_mode), ("--pretrained", options.pretrained)) if value]
    if options.resume is not None and (shaping or options.init is not None):
        raise InputError(f"--resume continues a run as it was: drop {', '.join(shaping or ['--init'])} (or start a new run with --init)")
    if options.init is not None:
        if options.pretrained:
            raise InputError("--init loads all weights from the checkpoint: drop --pretrained")
        if options.model != DEFAULT_MODEL:
            raise InputError("--init takes the model config from the checkpoint: drop --model")


def _initial_model(options: TrainOptions) -> CIRModel:
    """A new run's model: from --model (+ --pretrained), or from --init's checkpoint; --head, --head-option
    and --resize-mode apply on top. From --init, a kept head keeps its weights, a new head starts fresh."""
    def shaped(config: ModelConfig) -> ModelConfig:
        head = objective_head(config, options)
        return configure_model(config, head=head, head_options=options.head_option, resize_mode=options.resize_mode)

    if options.init is None:
        return CIRModel(shaped(resolve_model_config(options.model)), pretrained=options.pretrained)
    start = load_checkpoint(options.init)
    config = shaped(start.config)
    model = CIRModel(config)
    weights = start.model.state_dict()
    if config.head != start.config.head:
        weights = {key: value for key, value in weights.items() if not key.startswith("head.")}
    try:
        model.load_state_dict(weights, strict=config.head == start.config.head)
    except RuntimeError as exc:
        raise InputError(f"--init {options.init}: its weights do not fit the changed head options ({str(exc)[:300]})") from exc
    return model


def _autocast(device: torch.device, dtype: torch.dtype | None) -> contextlib.AbstractContextManager[Any]:
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


def _jsonable(value: Any) -> Any:
    return json.loads(json.dumps(value, default=str))


