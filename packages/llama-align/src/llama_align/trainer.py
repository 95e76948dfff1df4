"""The post-training loop: any `Objective` (SFT, reward model, DPO) over a list of examples, on one
process or data-parallel through accelerate, with crash-safe checkpoints and exact resume.

What the loop guarantees:

- **The same step whatever the split.** A step takes `batch_size` examples (the global batch);
  rank r of W takes every W-th of them and runs them in micro-batches of `micro_batch_size`. Each
  loss term is a sum divided by its denominator counted over the whole global batch (all-reduced
  before the forward passes), so 1 process and 2, or 1 micro-batch and 4, give the same gradients
  up to float summation order.
- **A fixed order of examples.** Epoch e visits the examples in the permutation drawn from
  ``seed + e``; step s takes positions ``[s·B, (s+1)·B)`` of the epochs laid end to end. The
  position is a function of the step, so resuming needs no data state.
- **Exact resume.** Every `checkpoint_every` steps (and at the end) the model, the optimizer, the
  RNG state and the step are written to a staging directory and published atomically
  (`llama_model.publish_directory`); a run killed at any moment restarts from the last one and
  continues bit for bit on CPU (same losses), its metrics files rewound to the resumed step.
- **Data parallelism through accelerate.** ``Accelerator(cpu=True)`` on a machine without CUDA:
  without it, accelerate on CPU silently runs every rank alone on all the data. On CUDA the model
  is wrapped in DistributedDataParallel by accelerate as usual. (FSDP through accelerate needs
  GPUs; it is not wired here.)
- **bf16 where it pays.** ``dtype="auto"`` computes under ``torch.autocast(bfloat16)`` on CUDA and
  on CPUs with fast bf16 matmuls (`llama_train.bf16_is_fast`), float32 elsewhere; the weights and
  the optimizer stay float32.

Metrics go to `metrics.jsonl` and TensorBoard (`llama_train`'s logger), a progress bar, and PNG
curves at the end.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import shutil
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Generic, Literal, TypeVar

import torch
from pydantic import BaseModel, ConfigDict, Field, NonNegativeInt, PositiveInt, model_validator
from torch import nn

from llama_align.objective import Batch, Metrics, Objective
from llama_model import publish_directory
from llama_train import LrSchedule, MetricsLogger, bf16_is_fast

__all__ = ["TrainSettings", "TrainResult", "AlignTrainer", "CHECKPOINT_DIR", "CURVES_FILE"]

logger = logging.getLogger(__name__)

CHECKPOINT_DIR = "checkpoint"  # the latest training checkpoint, inside the run directory
CURVES_FILE = "curves.png"  # every logged metric against the step, drawn at the end

Example = TypeVar("Example")


class TrainSettings(BaseModel):
    """How long and how a post-training stage trains (the loop's knobs, shared by every stage)."""

    model_config = ConfigDict(frozen=True, extra="forbid", use_attribute_docstrings=True)

    steps: PositiveInt = 100
    """Optimizer steps. Default 100: a small CPU run (the paper's SFT runs 8.5K-9K, §4.1.3)."""
    batch_size: PositiveInt = 8
    """Examples per optimizer step, over all ranks (a multiple of the number of ranks)."""
    micro_batch_size: PositiveInt = 4
    """Examples per forward pass on one rank; gradients accumulate over a rank's micro-batches."""
    lr: float = Field(default=1e-5, gt=0)
    """Peak learning rate. Default 1e-5: §4.1.3 (SFT) and §4.1.4 (DPO) both use 1e-5."""
    warmup_steps: NonNegativeInt = 0
    """Steps of linear warmup from 0 to `lr`."""
    final_lr: float | None = Field(default=None, ge=0)
    """Learning rate the cosine decays to at the last step; None keeps `lr` constant after warmup."""
    weight_decay: float = Field(default=0.0, ge=0)
    """AdamW's decoupled weight decay."""
    betas: tuple[float, float] = (0.9, 0.95)
    """AdamW's betas (Llama 3 pretraining's, §3.4.1 follows Llama 2: 0.9, 0.95)."""
    grad_clip: float | None = Field(default=1.0, gt=0)
    """Clip the global gradient norm to this; None does not clip."""
    seed: int = 0
    """Seeds the order of examples (epoch e uses seed + e) and the RNG (dropout)."""
    dtype: Literal["auto", "float32", "bfloat16"] = "auto"
    """Compute dtype: "auto" is bf16 autocast on CUDA and on CPUs with fast bf16 matmuls, else
    float32; weights and optimizer state stay float32 either way."""
    checkpoint_every: PositiveInt = 50
    """Write a resumable checkpoint every this many steps (and after the last step)."""
    log_every: PositiveInt = 1
    """Log metrics every this many steps."""
    tensorboard: bool = True
    """Also write TensorBoard scalars."""
    progress: bool = True
    """Show a progress bar (rank 0)."""

    @model_validator(mode="after")
    def _check(self) -> TrainSettings:
        if self.micro_batch_size > self.batch_size:
            raise ValueError(
                f"micro_batch_size ({self.micro_batch_size}) exceeds batch_size "
                f"({self.batch_size}); lower it to at most the batch size"
            )
        if self.warmup_steps >= self.steps and self.final_lr is not None:
            raise ValueError(
                f"warmup_steps ({self.warmup_steps}) must be below steps ({self.steps}) "
                "for a cosine decay to final_lr"
            )
        if self.final_lr is not None and self.final_lr > self.lr:
            raise ValueError(f"final_lr ({self.final_lr}) must not exceed lr ({self.lr})")
        return self

    def lr_at(self, step: int) -> float:
        """The learning rate of optimizer step `step` (0-based)."""
        if self.final_lr is None:
            if step < self.warmup_steps:
                return self.lr * step / self.warmup_steps
            return self.lr
        schedule = LrSchedule(
            peak_lr=self.lr,
            warmup_steps=self.warmup_steps,
            total_steps=self.steps,
            final_lr=self.final_lr,
        )
        return schedule.lr(step)

    def autocast(self, device: torch.device) -> contextlib.AbstractContextManager[Any]:
        """The autocast context training computes under on `device` (none for float32): run
        anything that must match the training forward (reference log-probabilities) inside it."""
        dtype = self.compute_dtype(device)
        if dtype == torch.float32:
            return contextlib.nullcontext()
        return torch.autocast(device.type, dtype=dtype)

    def optimizer(
        self, params: Iterable[torch.nn.Parameter], device: torch.device
    ) -> torch.optim.AdamW:
        """The AdamW the loop steps (`lr`, `betas`, `weight_decay`), with the fused kernel on CPU
        and CUDA: one pass over all tensors, 5x faster than the default on this CPU."""
        return torch.optim.AdamW(
            params,
            lr=self.lr,
            betas=self.betas,
            weight_decay=self.weight_decay,
            fused=device.type in ("cuda", "cpu"),
        )

    def compute_dtype(self, device: torch.device) -> torch.dtype:
        """The autocast dtype `dtype` resolves to on `device`."""
        if self.dtype == "float32":
            return torch.float32
        if self.dtype == "bfloat16":
            return torch.bfloat16
        if device.type == "cuda":
            return torch.bfloat16
        return torch.bfloat16 if bf16_is_fast(device) else torch.float32


@dataclass
class TrainResult:
    """What a finished (or resumed and finished) run did."""

    steps: int
    """Optimizer steps taken in total (including those before a resume)."""
    resumed_from: int | None
    """The step the run resumed at, or None for a fresh run."""
    losses: dict[int, float] = field(default_factory=dict)
    """Loss per step this process ran (rank 0; every rank has the same values)."""
    last_metrics: dict[str, float] = field(default_factory=dict)
    """The last step's logged values."""
    tokens_per_second: float = float("nan")
    """Tokens processed per second of this process's training steps (all ranks together)."""


class AlignTrainer(Generic[Example]):
    """Trains `model` on `examples` with `objective` (see the module docstring for guarantees).

    `model` is the trainable module whose forward the objective calls (a `Llama`, a PEFT-wrapped
    `Llama`, a `RewardModel`); parameters with ``requires_grad=False`` are frozen (not in the
    optimizer). `run_dir` holds the checkpoint, metrics and curves; a run finds its own
    checkpoint there and resumes.
    """

    def __init__(
        self,
        model: nn.Module,
        objective: Objective[Example],
        examples: Sequence[Example],
        settings: TrainSettings,
        run_dir: str | Path,
        *,
        accelerator: Any | None = None,
    ) -> None:
        if not examples:
            raise ValueError("no training examples: every row was dropped or the input is empty")
        from accelerate import Accelerator

        self.accelerator = (
            accelerator
            if accelerator is not None
            else Accelerator(cpu=not torch.cuda.is_available())
        )
        self.world = self.accelerator.num_processes
        self.rank = self.accelerator.process_index
        if settings.batch_size % self.world:
            raise ValueError(
                f"batch_size ({settings.batch_size}) must be a multiple of the number of "
                f"processes ({self.world})"
            )
        self.settings = settings
        self.objective = objective
        self.examples = examples
        self.run_dir = Path(run_dir)
        self.device = self.accelerator.device
        self.compute_dtype = settings.compute_dtype(self.device)
        self.unwrapped = model
        params = [p for p in model.parameters() if p.requires_grad]
        if not params:
            raise ValueError("the model has no trainable parameters (all requires_grad=False)")
        optimizer = settings.optimizer(params, self.device)
        self.model, self.optimizer = self.accelerator.prepare(model, optimizer)
        self.step = 0
        self.resumed_from: int | None = None
        self._epoch_order: tuple[int, torch.Tensor] | None = None  # (epoch, its permutation)
        self._load_checkpoint()

    # ----------------------------------------------------------------------------- data order

    def step_indices(self, step: int) -> list[int]:
        """The example indices of global batch `step` (all ranks), in order."""
        n, size = len(self.examples), self.settings.batch_size
        out: list[int] = []
        for position in range(step * size, (step + 1) * size):
            epoch, offset = divmod(position, n)
            out.append(int(self._permutation(epoch)[offset]))
        return out

    def _permutation(self, epoch: int) -> torch.Tensor:
        if self._epoch_order is None or self._epoch_order[0] != epoch:
            generator = torch.Generator().manual_seed(self.settings.seed + epoch)
            self._epoch_order = (epoch, torch.randperm(len(self.examples), generator=generator))
        return self._epoch_order[1]

    def _micro_batches(self, step: int) -> list[Batch]:
        mine = self.step_indices(step)[self.rank :: self.world]
        size = self.settings.micro_batch_size
        return [
            self.objective.collate([self.examples[i] for i in mine[start : start + size]])
            for start in range(0, len(mine), size)
        ]

    # ----------------------------------------------------------------------------- training

    def fit(self) -> TrainResult:
        """Train from the current step (0, or the resumed checkpoint's) to `settings.steps`."""
        settings = self.settings
        result = TrainResult(steps=self.step, resumed_from=self.resumed_from)
        metrics_log = MetricsLogger(
            self.run_dir,
            tensorboard=settings.tensorboard,
            enabled=self.rank == 0,
            resume_step=self.resumed_from,
        )
        progress = _progress(
            settings.steps, self.step, enabled=self.rank == 0 and settings.progress
        )
        tokens_done, seconds = 0, 0.0
        try:
            while self.step < settings.steps:
                started = time.perf_counter()
                values, tokens = self._train_step()
                seconds += time.perf_counter() - started
                tokens_done += tokens
                values["tokens_per_s"] = tokens / max(time.perf_counter() - started, 1e-9)
                result.losses[self.step] = values["loss"]
                result.last_metrics = values
                if self.step % settings.log_every == 0 or self.step + 1 == settings.steps:
                    metrics_log.log(self.step, values)
                self.step += 1
                progress.update(1)
                progress.set_postfix(loss=f"{values['loss']:.4f}")
                if self.step % settings.checkpoint_every == 0 or self.step == settings.steps:
                    self.save_checkpoint()
        finally:
            progress.close()
            metrics_log.close()
        if self.rank == 0:
            _plot_curves(metrics_log.metrics_path, self.run_dir / CURVES_FILE)
        result.steps = self.step
        result.tokens_per_second = tokens_done / seconds if seconds > 0 else float("nan")
        return result

    def _train_step(self) -> tuple[dict[str, float], int]:
        settings = self.settings
        lr = settings.lr_at(self.step)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        micro_batches = self._micro_batches(self.step)
        denominators = self._global_denominators(micro_batches)
        self.model.train()
        loss_total = torch.zeros((), dtype=torch.float64)
        parts: dict[str, torch.Tensor] = {}
        metric_sums: dict[str, torch.Tensor] = {}  # name -> [sum, count]
        tokens = 0
        for index, batch in enumerate(micro_batches):
            batch = _to_device(batch, self.device)
            tokens += _count_tokens(batch)
            last = index == len(micro_batches) - 1
            sync = contextlib.nullcontext() if last else self.accelerator.no_sync(self.model)
            with sync, self._autocast():
                sums, metrics = self.objective.loss_sums(self.model, batch)
                unknown = sums.keys() - denominators.keys()
                if unknown:
                    raise KeyError(
                        f"loss terms {sorted(unknown)} have no denominator (objective "
                        f"{type(self.objective).__name__} declares {sorted(denominators)})"
                    )
                # DDP averages gradients over ranks; the denominators already count every rank.
                loss = sum(
                    (sums[k].float() / denominators[k] for k in sums),
                    start=torch.zeros((), device=self.device),
                )
                self.accelerator.backward(loss * self.world)
            for key, value in sums.items():
                part = value.detach().double().cpu() / denominators[key]
                parts[key] = parts.get(key, torch.zeros((), dtype=torch.float64)) + part
                loss_total += part
            _add_metrics(metric_sums, metrics)
        grad_norm = self._clip()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        values = {"loss": float(self._reduce(loss_total)), "lr": lr}
        for key, part in parts.items():
            values[f"loss_{key}"] = float(self._reduce(part))
        for name, (total, count) in self._reduce_metrics(metric_sums).items():
            values[name] = total / count if count else float("nan")
        if grad_norm is not None:
            values["grad_norm"] = grad_norm
        tokens_all = int(self._reduce(torch.tensor(float(tokens), dtype=torch.float64)))
        return values, tokens_all

    def _global_denominators(self, micro_batches: list[Batch]) -> dict[str, float]:
        totals: dict[str, float] = {}
        for batch in micro_batches:
            for key, value in self.objective.denominators(batch).items():
                totals[key] = totals.get(key, 0.0) + float(value)
        keys = sorted(totals)
        if self.world > 1:  # every rank must reduce the same keys in the same order
            names: list[list[str] | None] = [None] * self.world
            torch.distributed.all_gather_object(names, keys)
            keys = sorted({k for ks in names for k in (ks or [])})
        reduced = self._reduce(
            torch.tensor([totals.get(k, 0.0) for k in keys], dtype=torch.float64)
        )
        out = dict(zip(keys, (float(v) for v in reduced), strict=True))
        empty = [k for k, v in out.items() if v <= 0]
        if empty:
            raise ValueError(
                f"step {self.step}: the global batch has nothing to learn for {empty} (zero "
                "loss tokens or pairs); check the data (e.g. SFT rows without assistant tokens)"
            )
        return out

    def _reduce(self, value: torch.Tensor) -> torch.Tensor:
        """Sum over ranks (a no-op on one process)."""
        if self.world == 1:
            return value
        value = value.to(self.device)
        torch.distributed.all_reduce(value)
        return value.cpu()

    def _reduce_metrics(self, sums: dict[str, torch.Tensor]) -> dict[str, tuple[float, float]]:
        keys = sorted(sums)  # the same on every rank: an objective returns the same metrics
        if not keys:
            return {}
        packed = torch.stack([sums[k] for k in keys])  # [M, 2] float64
        packed = self._reduce(packed)
        return {k: (float(packed[i, 0]), float(packed[i, 1])) for i, k in enumerate(keys)}

    def _clip(self) -> float | None:
        if self.settings.grad_clip is None:
            return None
        norm = self.accelerator.clip_grad_norm_(
            [p for p in self.unwrapped.parameters() if p.requires_grad], self.settings.grad_clip
        )
        return float(norm)

    def _autocast(self) -> contextlib.AbstractContextManager[Any]:
        return self.settings.autocast(self.device)

    # ----------------------------------------------------------------------------- checkpoints

    @property
    def checkpoint_dir(self) -> Path:
        """Where the latest training checkpoint lives."""
        return self.run_dir / CHECKPOINT_DIR

    def save_checkpoint(self) -> None:
        """Publish model, optimizer, RNG and step atomically (rank 0 writes; all ranks wait)."""
        if self.rank == 0:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            staging = self.run_dir / f".{CHECKPOINT_DIR}.partial"
            shutil.rmtree(staging, ignore_errors=True)
            staging.mkdir()
            model_state = {k: v.detach().cpu() for k, v in self.unwrapped.state_dict().items()}
            torch.save(model_state, staging / "model.pt")
            torch.save(self.optimizer.state_dict(), staging / "optimizer.pt")
            torch.save({"cpu": torch.get_rng_state()}, staging / "rng.pt")
            (staging / "state.json").write_text(
                json.dumps({"step": self.step, "examples": len(self.examples)})
            )
            publish_directory(staging, self.checkpoint_dir)
        self.accelerator.wait_for_everyone()

    def _load_checkpoint(self) -> None:
        directory = self.checkpoint_dir
        if not (directory / "state.json").is_file():
            return
        state = json.loads((directory / "state.json").read_text())
        if state["examples"] != len(self.examples):
            raise ValueError(
                f"{directory} was written for {state['examples']} examples, but this run has "
                f"{len(self.examples)}: the data changed since the run started; use a new run "
                "directory or restore the data"
            )
        if state["step"] > self.settings.steps:
            raise ValueError(
                f"{directory} is at step {state['step']}, beyond steps={self.settings.steps}; "
                "raise steps or use a new run directory"
            )
        model_state = torch.load(directory / "model.pt", weights_only=True, map_location="cpu")
        self.unwrapped.load_state_dict(model_state)
        optimizer_state = torch.load(
            directory / "optimizer.pt", weights_only=True, map_location="cpu"
        )
        self.optimizer.load_state_dict(optimizer_state)
        torch.set_rng_state(torch.load(directory / "rng.pt", weights_only=True)["cpu"])
        self.step = self.resumed_from = int(state["step"])
        logger.info("resumed from %s at step %d", directory, self.step)


# --------------------------------------------------------------------------------------------
# helpers


def _to_device(batch: Batch, device: torch.device) -> Batch:
    return {
        k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v
        for k, v in batch.items()
    }


def _count_tokens(batch: Batch) -> int:
    """Tokens a micro-batch processes: its `num_tokens` entry if the objective gave one (padding
    left out), else the size of its `tokens` tensor."""
    if "num_tokens" in batch:
        return int(batch["num_tokens"])
    tokens = batch.get("tokens")
    return int(tokens.numel()) if isinstance(tokens, torch.Tensor) else 0


def _add_metrics(into: dict[str, torch.Tensor], metrics: Metrics) -> None:
    for name, (total, count) in metrics.items():
        pair = torch.stack(
            [total.detach().double().cpu().reshape(()), torch.as_tensor(count).double().cpu()]
        )
        into[name] = into[name] + pair if name in into else pair


class _NoProgress:
    def update(self, n: int) -> None: ...
    def set_postfix(self, **kwargs: Any) -> None: ...
    def close(self) -> None: ...


def _progress(total: int, start: int, *, enabled: bool) -> Any:
    if not enabled:
        return _NoProgress()
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=start, desc="train", unit="step", dynamic_ncols=True)


def _plot_curves(metrics_jsonl: Path, png: Path) -> Path | None:
    """Every numeric metric against the step, one small panel each (skipped if none logged)."""
    if not metrics_jsonl.is_file():
        return None
    records = [json.loads(line) for line in metrics_jsonl.read_text().splitlines() if line]
    names = sorted(
        {
            k
            for r in records
            for k, v in r.items()
            if k not in ("step", "time") and isinstance(v, int | float) and math.isfinite(v)
        }
    )
    if not names:
        return None
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from llama_model import atomic_write

    columns = 3
    rows = math.ceil(len(names) / columns)
    figure = Figure(figsize=(4 * columns, 2.6 * rows), dpi=100)
    FigureCanvasAgg(figure)
    for index, name in enumerate(names):
        axes = figure.add_subplot(rows, columns, index + 1)
        points = [(r["step"], r[name]) for r in records if isinstance(r.get(name), int | float)]
        axes.plot([p[0] for p in points], [p[1] for p in points], linewidth=1)
        axes.set_title(name, fontsize=9)
        axes.tick_params(labelsize=7)
    figure.tight_layout()
    with atomic_write(png) as tmp:
        figure.savefig(tmp, format="png")
    return png
