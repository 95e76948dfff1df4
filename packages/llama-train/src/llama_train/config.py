"""`TrainConfig`: everything a pretraining run needs, validated, from defaults, TOML and the CLI.

Precedence is CLI > TOML > defaults: `TrainConfig.load(path, overrides)` reads the TOML file, then
applies dotted overrides such as ``optimizer.peak_lr=3e-4`` or ``parallel.tp=2`` (values parsed as
TOML literals, so ``data.sources=[...]`` works too). Unknown keys are errors that name the key.

The defaults are a small CPU run of the `debug` model; `TrainConfig.llama3_405b()` gives the
paper's recipe (§3.4.1) at full scale.
"""

from __future__ import annotations

import tomllib
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal, Self

from pydantic import BaseModel, ConfigDict, Field, PositiveInt, model_validator

from llama_model import PRESETS, LlamaConfig
from llama_train.parallel.mesh import ParallelDims
from llama_train.parallel.pipeline import check_layers_per_stage, check_schedule
from llama_train.schedules import BatchRamp, BatchStage, LrSchedule

__all__ = [
    "AnnealConfig",
    "CheckpointConfig",
    "DataConfig",
    "LoggingConfig",
    "ModelConfig",
    "OptimizerConfig",
    "ParallelConfig",
    "SourceConfig",
    "SpikeConfig",
    "TrainConfig",
]


class _Section(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class ModelConfig(_Section):
    """Which architecture: a `llama_model` preset plus field overrides (e.g. max_seq_len)."""

    preset: str = "debug"
    overrides: dict[str, Any] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _check(self) -> Self:
        if self.preset not in PRESETS:
            raise ValueError(f"unknown model preset {self.preset!r}; valid: {', '.join(PRESETS)}")
        self.llama_config()  # validate the overrides now, not at step 0
        return self

    def llama_config(self) -> LlamaConfig:
        return LlamaConfig.from_preset(self.preset, **self.overrides)


class SourceConfig(_Section):
    """A token-shard directory (written by `llama_data.write_token_shards`) and its mixture weight."""

    path: Path
    weight: float = Field(default=1.0, gt=0)
    name: str | None = None  # defaults to the directory name

    @property
    def label(self) -> str:
        return self.name or self.path.name


class DataConfig(_Section):
    """Training data: a weighted mixture of token shards, the batch ramp (§3.4.1), the seed.

    Without `ramp`, every step is `batch_size` sequences of `seq_len` tokens. A ramp (list of
    `{tokens_seen_threshold, batch_tokens, seq_len}`) changes both with the tokens seen, which also
    expresses the staged context-length increase of §3.4.2.
    """

    sources: tuple[SourceConfig, ...] = ()
    batch_size: PositiveInt = 8
    seq_len: PositiveInt = 256
    ramp: tuple[BatchStage, ...] | None = None
    seed: int = 0

    @model_validator(mode="after")
    def _check(self) -> Self:
        labels = [s.label for s in self.sources]
        if len(set(labels)) != len(labels):
            raise ValueError(f"data.sources names must be unique, got {labels}; set `name`")
        if self.ramp is not None and {"batch_size", "seq_len"} & self.model_fields_set:
            first = self.ramp[0]
            if (first.seq_len, first.sequences_per_batch) != (self.seq_len, self.batch_size):
                raise ValueError(
                    f"data.batch_size={self.batch_size} and data.seq_len={self.seq_len} disagree "
                    f"with data.ramp's first stage ({first.sequences_per_batch} sequences of "
                    f"{first.seq_len}); the ramp decides: remove them or make them agree"
                )
        return self

    def batch_ramp(self) -> BatchRamp:
        if self.ramp is not None:
            return BatchRamp(stages=self.ramp)
        return BatchRamp(
            stages=(
                BatchStage(
                    tokens_seen_threshold=0,
                    batch_tokens=self.batch_size * self.seq_len,
                    seq_len=self.seq_len,
                ),
            )
        )


class OptimizerConfig(_Section):
    """AdamW with linear warmup and cosine decay (§3.4.1); betas, eps, weight decay and clipping
    are Llama 2's (Touvron et al. 2023, §2.2), which the Llama 3 paper does not restate."""

    peak_lr: float = Field(default=2e-3, gt=0)
    final_lr: float = Field(default=2e-4, ge=0)
    warmup_steps: int = Field(default=10, ge=0)
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = Field(default=1e-5, gt=0)
    weight_decay: float = Field(default=0.1, ge=0)
    max_grad_norm: float = Field(default=1.0, gt=0)


class AnnealConfig(_Section):
    """§3.4.3: over the final `steps` steps the learning rate falls linearly to 0 on a separate
    high-quality mix (`sources`; empty keeps the main mix), and the checkpoints saved every
    `checkpoint_interval` steps during annealing are Polyak-averaged into the final model."""

    steps: int = Field(default=0, ge=0)
    sources: tuple[SourceConfig, ...] = ()
    checkpoint_interval: PositiveInt = 10

    @model_validator(mode="after")
    def _check(self) -> Self:
        labels = [s.label for s in self.sources]
        if len(set(labels)) != len(labels):
            raise ValueError(f"anneal.sources names must be unique, got {labels}; set `name`")
        return self


class ParallelConfig(_Section):
    """Degrees of parallelism (see `ParallelDims`) and per-parallelism options."""

    dp_replicate: PositiveInt = 1
    dp_shard: int = -1
    cp: PositiveInt = 1
    tp: PositiveInt = 1
    pp: PositiveInt = 1
    sequence_parallel: bool = True
    pp_schedule: Literal["1F1B", "Interleaved1F1B", "GPipe"] = "1F1B"
    pp_microbatches: PositiveInt = 4
    pp_stages_per_rank: PositiveInt = 1
    pp_layers_per_stage: tuple[int, ...] | None = None  # first/last stage may get fewer layers

    def dims(self) -> ParallelDims:
        return ParallelDims(
            dp_replicate=self.dp_replicate,
            dp_shard=self.dp_shard,
            cp=self.cp,
            tp=self.tp,
            pp=self.pp,
        )


class CheckpointConfig(_Section):
    """Sharded `torch.distributed.checkpoint` saves under `<out_dir>/checkpoints/step-NNNNNNNN`."""

    interval: int = Field(
        default=50, ge=0, description="steps between saves; 0 saves only at the end"
    )
    keep_last: PositiveInt = 2
    async_save: bool = False
    resume: bool = True  # continue from the latest complete checkpoint in out_dir if there is one


class SpikeConfig(_Section):
    """Loss-spike handling: a step whose loss is non-finite or exceeds the mean of the last
    `window` accepted losses by `zscore` standard deviations (and by `min_ratio` relatively) is
    skipped; `max_consecutive` skips in a row roll back to the last checkpoint, keeping the data
    position so the offending batches are not replayed."""

    enabled: bool = True
    window: PositiveInt = 50
    min_history: PositiveInt = 10
    zscore: float = Field(default=6.0, gt=0)
    min_ratio: float = Field(default=0.1, ge=0)
    max_consecutive: PositiveInt = 3


class LoggingConfig(_Section):
    progress: bool = True
    tensorboard: bool = True
    log_interval: PositiveInt = 1
    peak_tflops: float | None = Field(
        default=None,
        gt=0,
        description="accelerator's dense peak for MFU; default: known GPUs' bf16 peak",
    )


class TrainConfig(_Section):
    """A pretraining run. See the module docstring for how to load one."""

    model: ModelConfig = ModelConfig()
    data: DataConfig = DataConfig()
    optimizer: OptimizerConfig = OptimizerConfig()
    anneal: AnnealConfig = AnnealConfig()
    parallel: ParallelConfig = ParallelConfig()
    checkpoint: CheckpointConfig = CheckpointConfig()
    spikes: SpikeConfig = SpikeConfig()
    logging: LoggingConfig = LoggingConfig()
    steps: PositiveInt = 100
    seed: int = 0
    out_dir: Path = Path("llama-train-output")
    device: Literal["auto", "cpu", "cuda"] = "auto"
    dtype: Literal["float32", "bfloat16"] = "float32"  # compute dtype; master weights stay fp32
    activation_checkpointing: bool = False
    compile: bool = False
    export: bool = True  # write the final model in the Hugging Face layout to <out_dir>/model

    @model_validator(mode="after")
    def _check(self) -> Self:
        if self.anneal.steps >= self.steps:
            raise ValueError(
                f"anneal.steps ({self.anneal.steps}) must be smaller than steps ({self.steps})"
            )
        if self.optimizer.warmup_steps >= self.steps - self.anneal.steps:
            raise ValueError(
                f"optimizer.warmup_steps ({self.optimizer.warmup_steps}) must be smaller than "
                f"steps - anneal.steps ({self.steps} - {self.anneal.steps}): warmup and the "
                "cosine decay come before annealing"
            )
        if self.optimizer.final_lr > self.optimizer.peak_lr:
            raise ValueError(
                f"optimizer.final_lr ({self.optimizer.final_lr}) exceeds optimizer.peak_lr "
                f"({self.optimizer.peak_lr})"
            )
        p = self.parallel
        if p.pp > 1:  # the schedule and the split are checkable before any process starts
            check_schedule(
                p.pp_schedule,
                n_microbatches=p.pp_microbatches,
                pp_size=p.pp,
                stages_per_rank=p.pp_stages_per_rank,
            )
            check_layers_per_stage(
                p.pp_layers_per_stage,
                self.model.llama_config().n_layers,
                p.pp * p.pp_stages_per_rank,
            )
        max_seq = max(s.seq_len for s in self.data.batch_ramp().stages)
        limit = self.model.llama_config().max_seq_len
        if max_seq > limit:
            raise ValueError(
                f"data sequence length {max_seq} exceeds the model's max_seq_len {limit}; "
                "raise model.overrides = {max_seq_len = ...} or shorten the sequences"
            )
        return self

    def lr_schedule(self) -> LrSchedule:
        """The warmup + cosine schedule over the pre-annealing steps (annealing takes over after)."""
        o = self.optimizer
        return LrSchedule(
            peak_lr=o.peak_lr,
            warmup_steps=o.warmup_steps,
            total_steps=self.steps - self.anneal.steps,
            final_lr=o.final_lr,
        )

    @classmethod
    def load(cls, path: str | Path | None = None, overrides: Sequence[str] = ()) -> TrainConfig:
        """Defaults, updated by the TOML file at `path`, updated by ``key.sub=value`` overrides."""
        data: dict[str, Any] = {}
        if path is not None:
            with open(path, "rb") as f:
                data = tomllib.load(f)
        for item in overrides:
            key, sep, raw = item.partition("=")
            if not sep or not key:
                raise ValueError(f"override {item!r} must look like section.key=value")
            _set_dotted(data, key.strip(), _parse_value(raw.strip()))
        return cls.model_validate(data)

    @classmethod
    def llama3_405b(cls, sources: Sequence[SourceConfig] = ()) -> TrainConfig:
        """§3.4.1 at full scale: 405B, peak lr 8e-5 with 8,000 warmup steps and cosine decay to
        8e-7 over 1.2M steps, the 4M → 8M → 16M-token batch ramp, bf16."""
        ramp = BatchRamp.llama3_405b()
        return cls(
            model=ModelConfig(preset="llama3.1-405b"),
            data=DataConfig(sources=tuple(sources), ramp=ramp.stages),
            optimizer=OptimizerConfig(peak_lr=8e-5, final_lr=8e-7, warmup_steps=8_000),
            steps=1_200_000,
            dtype="bfloat16",
            activation_checkpointing=True,
            parallel=ParallelConfig(tp=8, cp=1, pp=16, pp_microbatches=16),
        )


def _parse_value(raw: str) -> Any:
    """A TOML literal (number, bool, string, array, inline table), else the raw string."""
    try:
        return tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        return raw


def _set_dotted(data: dict[str, Any], key: str, value: Any) -> None:
    parts = key.split(".")
    node = data
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ValueError(f"override {key!r}: {part!r} is a value, not a section")
        node = child
    node[parts[-1]] = value


def config_as_toml_dict(config: TrainConfig) -> Mapping[str, Any]:
    """The config as plain data (paths as strings, None dropped) for writing next to a run."""
    return config.model_dump(mode="json", exclude_none=True)
