"""`TrainConfig`: everything a pretraining run needs, validated, from defaults, TOML and the CLI.

Precedence is CLI > TOML > defaults: `TrainConfig.load(path, overrides)` reads the TOML file, then
applies dotted overrides such as ``optimizer.peak_lr=3e-4`` or ``parallel.tp=2`` (values parsed as
TOML literals, so ``data.sources=[...]`` works too). Unknown keys are errors that name the key.

The defaults are a small CPU run of the `debug` model; `TrainConfig.llama3_405b()` gives the
paper's recipe (§3.4.1) at full scale. Every field's docstring says what it is, its unit and where
its default comes from (the paper, Llama 2's recipe, torchtitan, or a small CPU run); pydantic
exposes them as ``Field.description``. A rejected config reads as one line per problem
(`llama_model.format_validation_error`), which is what `llama-train` prints.
"""

from __future__ import annotations

import textwrap
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal, Self

from pydantic import BaseModel, ConfigDict, Field, PositiveInt, ValidationError, model_validator

from llama_model import PRESETS, LlamaConfig, format_validation_error, load_config
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
    model_config = ConfigDict(frozen=True, extra="forbid", use_attribute_docstrings=True)


class ModelConfig(_Section):
    """Which architecture: a `llama_model` preset plus field overrides (e.g. max_seq_len), and
    the attention kernel for packed documents."""

    preset: str = "debug"
    """Name of a `llama_model.PRESETS` size (``"llama3.1-8b"``, ``"llama3.1-405b"``: Table 3).
    Default ``"debug"``: 4 layers of width 256 with the full vocabulary, a small CPU run."""
    overrides: dict[str, Any] = Field(default_factory=dict)
    """`LlamaConfig` fields replaced on the preset, e.g. ``{max_seq_len = 512}`` (units as in
    `LlamaConfig`); an unknown field is an error listing the valid ones. Default: none."""
    attention_kernel: Literal["auto", "dense", "flex"] = "auto"
    """Which kernel computes attention over packed documents: ``"flex"`` is FlexAttention with a
    block mask (block-sparse: blocks across documents are skipped; the fast path on CUDA),
    ``"dense"`` a dense boolean mask with `scaled_dot_product_attention`, ``"auto"`` flex on CUDA
    and dense elsewhere. Default ``"auto"``: FlexAttention's fused kernel is compiled for GPUs and
    has no backward on CPU, so "flex" trains on CUDA only; context parallelism always attends
    with a dense mask over the gathered keys (the trainer refuses "flex" there)."""

    @model_validator(mode="after")
    def _check(self) -> Self:
        if self.preset not in PRESETS:
            raise ValueError(f"unknown model preset {self.preset!r}; valid: {', '.join(PRESETS)}")
        try:
            self.llama_config()  # validate the overrides now, not at step 0
        except ValidationError as error:  # named as the user wrote them: model.overrides.<field>
            lines = format_validation_error(error, LlamaConfig, prefix="model.overrides")
            raise ValueError(textwrap.dedent(lines)) from error
        return self

    def llama_config(self) -> LlamaConfig:
        """The preset with the overrides applied."""
        return LlamaConfig.from_preset(self.preset, **self.overrides)


class SourceConfig(_Section):
    """A token-shard directory (written by `llama_data.write_token_shards`) and its mixture weight."""

    path: Path
    """Token-shard directory (``manifest.json`` plus shards) written by llama-data. Required."""
    weight: float = Field(default=1.0, gt=0)
    """Relative share of each batch's sequences drawn from this source (unitless; the weights are
    normalised over the mixture, need not sum to 1). Default 1: equal shares."""
    name: str | None = None
    """Label of the source in the data loader's checkpointed state (a resumed run must name its
    sources the same); unique within a mixture. Default None: the directory's name."""

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
    """The weighted mixture the run trains on; training needs at least one (checked when the
    trainer starts). Default empty, so that a config can be written and printed before data."""
    batch_size: PositiveInt = 8
    """Sequences per optimizer step, global (split across data-parallel ranks), without `ramp`.
    Default 8: a small CPU run (the paper's 405B starts at 1,024 sequences, §3.4.1)."""
    seq_len: PositiveInt = 256
    """Tokens per training sequence without `ramp`. Default 256: a small CPU run (the paper's
    405B: 4,096, then 8,192, §3.4.1)."""
    ramp: tuple[BatchStage, ...] | None = None
    """Batch size and sequence length as a step function of the tokens seen (§3.4.1; the staged
    context lengths of §3.4.2 too); `BatchRamp.llama3_405b()` gives the paper's stages. Default
    None: every step is `batch_size` sequences of `seq_len` tokens."""
    seed: int = 0
    """Seed of the data order: the mixture draw of each batch and each source's shuffle (the
    annealing mix uses seed + 1). Default 0."""

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
    """Learning rate at the end of warmup, the top of the cosine. Default 2e-3: a small CPU run of
    the `debug` model (the paper's 405B: 8e-5, §3.4.1)."""
    final_lr: float = Field(default=2e-4, ge=0)
    """Learning rate the cosine reaches at ``steps - anneal.steps``; at most `peak_lr`. Default
    2e-4, a tenth of the peak as in Llama 2 (§2.2) (the paper's 405B: 8e-7, §3.4.1)."""
    warmup_steps: int = Field(default=10, ge=0)
    """Optimizer steps of linear warmup from 0 to `peak_lr`. Default 10: a small CPU run (the
    paper's 405B: 8,000, §3.4.1)."""
    betas: tuple[float, float] = (0.9, 0.95)
    """AdamW's (beta1, beta2) decay rates of the gradient moments. Llama 2's (0.9, 0.95) (§2.2)."""
    eps: float = Field(default=1e-5, gt=0)
    """AdamW's epsilon, added to the root of the second moment. Llama 2's 1e-5 (§2.2)."""
    weight_decay: float = Field(default=0.1, ge=0)
    """AdamW's decoupled weight decay (per step, times the lr) on every matrix, embeddings
    included, not on the RMSNorm gains. Llama 2's 0.1 (§2.2)."""
    max_grad_norm: float = Field(default=1.0, gt=0)
    """Clip the gradient to this global L2 norm (over every shard and pipeline stage). Llama 2's
    1.0 (§2.2)."""


class AnnealConfig(_Section):
    """§3.4.3: over the final `steps` steps the learning rate falls linearly to 0 on a separate
    high-quality mix (`sources`; empty keeps the main mix), and the checkpoints saved every
    `checkpoint_interval` steps during annealing are Polyak-averaged into the final model."""

    steps: int = Field(default=0, ge=0)
    """Final optimizer steps over which the learning rate falls linearly to 0 (the paper anneals
    over the last 40M tokens, §3.4.3). Default 0: no annealing."""
    sources: tuple[SourceConfig, ...] = ()
    """The high-quality mix trained on while annealing (§3.4.3). Default empty: keep the main mix."""
    checkpoint_interval: PositiveInt = 10
    """Optimizer steps between the annealing snapshots that are Polyak-averaged into the final
    model; the last annealing step is always one. Default 10: a small CPU run (the paper gives no
    interval)."""

    @model_validator(mode="after")
    def _check(self) -> Self:
        labels = [s.label for s in self.sources]
        if len(set(labels)) != len(labels):
            raise ValueError(f"anneal.sources names must be unique, got {labels}; set `name`")
        return self


class ParallelConfig(_Section):
    """Degrees of parallelism (see `ParallelDims`) and per-parallelism options."""

    dp_replicate: PositiveInt = 1
    """Ranks holding full replicas of the sharded model (HSDP's replicate dimension). Default 1."""
    dp_shard: int = -1
    """Ranks each replica's parameters, gradients and optimizer state are sharded over (FSDP2).
    Default -1: whatever the other degrees leave of the world size (torchtitan's convention)."""
    cp: PositiveInt = 1
    """Context-parallel ranks: each sequence is split in 2·cp load-balanced chunks and keys and
    values are all-gathered (§3.3.2). Default 1: off."""
    tp: PositiveInt = 1
    """Tensor-parallel ranks: attention heads and FFN columns are split (Megatron layout, §3.3.2).
    Default 1: off."""
    pp: PositiveInt = 1
    """Pipeline-parallel ranks, each holding consecutive Transformer blocks (§3.3.2). Default 1:
    off."""
    sequence_parallel: bool = True
    """With tp > 1, also shard the residual stream and the RMSNorms along the sequence (Megatron
    sequence parallelism): less activation memory at the same communication. Default on, as in
    torchtitan."""
    pp_schedule: Literal["1F1B", "Interleaved1F1B", "GPipe"] = "1F1B"
    """Pipeline schedule (`torch.distributed.pipelining`); the paper uses an interleaved one
    (§3.3.2). Default ``"1F1B"``, with one stage per rank."""
    pp_microbatches: PositiveInt = 4
    """Microbatches each batch is split into for the pipeline; 1F1B needs at least `pp`. Default
    4: enough for a 4-stage 1F1B pipeline."""
    pp_stages_per_rank: PositiveInt = 1
    """Pipeline stages (virtual stages) each rank holds; more than 1 for ``Interleaved1F1B``.
    Default 1."""
    pp_layers_per_stage: tuple[int, ...] | None = None
    """Transformer blocks of each stage, summing to the model's n_layers; the first and last stage
    may get fewer to balance the embedding and the output projection (§3.3.2). Default None: an
    even split."""

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

    interval: int = Field(default=50, ge=0)
    """Optimizer steps between saves; 0 saves only at the end. Default 50: a small CPU run."""
    keep_last: PositiveInt = 2
    """Newest complete checkpoints kept; older ones are deleted (annealing snapshots are kept
    apart, never pruned). Default 2: the newest and the one before it."""
    async_save: bool = False
    """Write checkpoints in a background thread while training continues (DCP ``async_save``, on
    its own gloo group). Default off: the simpler path."""
    resume: bool = True
    """Continue from the newest complete checkpoint in `out_dir` if there is one; off, earlier
    checkpoints are moved aside to ``checkpoints.previous-N`` (never deleted). Default on."""


class SpikeConfig(_Section):
    """Loss-spike handling: a step whose loss is non-finite or exceeds the mean of the last
    `window` accepted losses by `zscore` standard deviations (and by `min_ratio` relatively) is
    skipped; `max_consecutive` skips in a row roll back to the last checkpoint, keeping the data
    position so the offending batches are not replayed."""

    enabled: bool = True
    """Judge every step's loss; off, every update is applied and a non-finite loss stops the run.
    Default on. The paper gives no thresholds: those below are this project's."""
    window: PositiveInt = 50
    """Accepted losses (steps) whose mean and standard deviation set the threshold. Default 50."""
    min_history: PositiveInt = 10
    """Accepted losses (steps) needed before a finite loss can be judged a spike; at most `window`.
    Default 10."""
    zscore: float = Field(default=6.0, gt=0)
    """Standard deviations above the running mean that make a spike. Default 6: far in the tail
    of the step-to-step noise."""
    min_ratio: float = Field(default=0.1, ge=0)
    """A spike must also exceed the running mean by this fraction of it (unitless; guards against
    a tiny standard deviation on a flat loss). Default 0.1: 10%."""
    max_consecutive: PositiveInt = 3
    """Skipped steps in a row that roll the weights back to the last checkpoint. Default 3."""


class LoggingConfig(_Section):
    """What a run reports: ``metrics.jsonl``, TensorBoard, a progress bar, MFU."""

    progress: bool = True
    """A progress bar (tqdm) with loss and lr on rank 0. Default on."""
    tensorboard: bool = True
    """Write the metrics as TensorBoard scalars under ``<out_dir>/tensorboard`` too. Default on."""
    log_interval: PositiveInt = 1
    """Optimizer steps between rows of ``metrics.jsonl`` (the last step is always logged).
    Default 1: every step."""
    peak_tflops: float | None = Field(default=None, gt=0)
    """One accelerator's dense peak in TFLOP/s, for model-FLOPs utilisation (MFU). Default None:
    the bf16 peak of known GPUs (A100, H100, H200) when `dtype` is bfloat16; else no MFU."""


class TrainConfig(_Section):
    """A pretraining run. See the module docstring for how to load one."""

    model: ModelConfig = ModelConfig()
    """The architecture: a preset, overrides, the attention kernel."""
    data: DataConfig = DataConfig()
    """The token-shard mixture, batch shape or ramp, and data seed."""
    optimizer: OptimizerConfig = OptimizerConfig()
    """AdamW and its warmup + cosine learning-rate schedule."""
    anneal: AnnealConfig = AnnealConfig()
    """The final linear decay to 0 and checkpoint averaging (§3.4.3); off by default."""
    parallel: ParallelConfig = ParallelConfig()
    """Parallelism degrees and options; by default one process, FSDP over all ranks under torchrun."""
    checkpoint: CheckpointConfig = CheckpointConfig()
    """When and how to save, how many to keep, whether to resume."""
    spikes: SpikeConfig = SpikeConfig()
    """Loss-spike skipping and rollback."""
    logging: LoggingConfig = LoggingConfig()
    """Metrics files, TensorBoard, progress bar, MFU."""
    steps: PositiveInt = 100
    """Optimizer steps of the whole run, warmup and annealing included. Default 100: a small CPU
    run (the paper's 405B: 1.2M, §3.4.1)."""
    seed: int = 0
    """Seed of the weight initialisation (each parameter is drawn from a generator seeded by it
    and the parameter's name, so every parallel layout starts from the same weights). Default 0."""
    out_dir: Path = Path("llama-train-output")
    """Directory of the checkpoints, metrics, events and exported model; relative paths are to the
    working directory. Default ``llama-train-output``."""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    """Where to train: ``"auto"`` is CUDA (the rank's local GPU) when available, else the CPU;
    ``"cuda"`` without a GPU is an error. Default ``"auto"``."""
    dtype: Literal["float32", "bfloat16"] = "float32"
    """Compute dtype; master weights, optimizer state and reductions stay float32 (the paper
    trains in bf16, Table 4). Default float32: what the CPU parity tests compare at."""
    activation_checkpointing: bool = False
    """Recompute each Transformer block's activations in the backward pass instead of storing
    them: less memory for about one more forward of compute. Default off."""
    compile: bool = False
    """`torch.compile` each Transformer block and the loss. Default off: compiling takes longer
    than a short CPU run."""
    export: bool = True
    """At the end, write the final model (the Polyak average of the annealing snapshots, else the
    last checkpoint) to ``<out_dir>/model`` in the Hugging Face layout. Default on."""

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
        """Defaults, updated by the TOML file at `path`, updated by ``key.sub=value`` overrides.

        Raises `pydantic.ValidationError` for a config that does not validate (print it with
        ``llama_model.format_validation_error(error, TrainConfig)``), `ValueError` for an override
        that is not ``key=value`` (its message is written in the same form: ``key: what is wrong``),
        `tomllib.TOMLDecodeError` and `OSError` for the file.
        """
        return load_config(cls, path, overrides)

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


def config_as_toml_dict(config: TrainConfig) -> Mapping[str, Any]:
    """The config as plain data (paths as strings, None dropped) for writing next to a run."""
    return config.model_dump(mode="json", exclude_none=True)
