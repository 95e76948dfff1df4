"""Pretraining schedules of Llama 3: learning rate, batch size, context length, annealing.

Implements the schedule parts of "The Llama 3 Herd of Models" (Llama Team, 2024):

- §3.4.1 initial pre-training: linear warmup then cosine decay of the learning rate
  (:class:`LrSchedule`), and a batch size that grows with the tokens seen (:class:`BatchRamp`);
- §3.4.2 long-context pre-training: the context length grows in stages (:class:`ContextSchedule`);
- §3.4.3 annealing: the learning rate goes linearly to 0 at the end (:func:`annealed_lr`).

Everything here is a pure function of a step or token count, so it can be tested exactly and
plugged into any training loop.

Units. The paper writes "4M tokens" for a batch of 1,024 sequences of 4,096 tokens, so batch
sizes here are binary: ``M = 2**20`` (4M = 4 x 2**20 = 4,194,304 = 1,024 x 4,096 tokens).
Token *counts* (252M, 2.87T, 800B) are data quantities, reported in decimal like the 15T tokens
of the corpus, so thresholds here are decimal: 252M = 252 x 10**6.
"""

from __future__ import annotations

import math

from pydantic import BaseModel, ConfigDict, Field, NonNegativeInt, PositiveInt, model_validator

__all__ = [
    "LrSchedule",
    "BatchStage",
    "BatchRamp",
    "ContextStage",
    "ContextSchedule",
    "annealed_lr",
    "MI",
    "LLAMA3_ANNEAL_TOKENS",
]

MI = 2**20
"""Binary mega: the "M" of the paper's batch sizes (4M tokens = 1,024 sequences of 4,096)."""

LLAMA3_ANNEAL_TOKENS = 40_000_000
"""§3.4.3: "during pre-training on the final 40M tokens, we linearly annealed the learning rate
to 0". Taken as written (decimal); at a 16M-token batch this is only about 2.4 optimizer steps."""


# --------------------------------------------------------------------------------------------
# Learning rate (§3.4.1)
# --------------------------------------------------------------------------------------------


class LrSchedule(BaseModel):
    """Linear warmup from 0 to ``peak_lr``, then cosine decay to ``final_lr``, then constant.

    ``lr(step)`` is ``peak_lr * step / warmup_steps`` for ``step < warmup_steps``; then
    ``final_lr + (peak_lr - final_lr) * (1 + cos(pi * p)) / 2`` with
    ``p = (step - warmup_steps) / (total_steps - warmup_steps)``; and ``final_lr`` from
    ``total_steps`` on. ``total_steps`` counts from step 0, warmup included.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    peak_lr: float = Field(gt=0)
    """Learning rate reached at the end of warmup (the top of the cosine)."""
    warmup_steps: NonNegativeInt
    """Steps of linear warmup from 0 to ``peak_lr``; 0 starts at ``peak_lr``."""
    total_steps: PositiveInt
    """Step at which the cosine reaches ``final_lr``; counted from step 0, warmup included."""
    final_lr: float = Field(ge=0)
    """Learning rate at and after ``total_steps``; at most ``peak_lr``."""

    @model_validator(mode="after")
    def _check_consistent(self) -> LrSchedule:
        if self.total_steps <= self.warmup_steps:
            raise ValueError(
                f"total_steps ({self.total_steps}) must exceed warmup_steps "
                f"({self.warmup_steps}): the cosine decay needs at least one step"
            )
        if self.final_lr > self.peak_lr:
            raise ValueError(
                f"final_lr ({self.final_lr}) must not exceed peak_lr ({self.peak_lr}); "
                "the schedule decays"
            )
        return self

    @classmethod
    def llama3_405b(cls, total_steps: int = 1_200_000) -> LrSchedule:
        """§3.4.1: "a peak learning rate of 8e-5, a linear warm up of 8,000 steps, and a cosine
        learning rate schedule decaying to 8e-7 over 1,200,000 steps"."""
        return cls(peak_lr=8e-5, warmup_steps=8_000, total_steps=total_steps, final_lr=8e-7)

    def lr(self, step: int) -> float:
        """Learning rate at optimizer step ``step`` (0-based)."""
        if step < 0:
            raise ValueError(f"step must be >= 0, got {step}")
        if step < self.warmup_steps:
            return self.peak_lr * step / self.warmup_steps
        if step >= self.total_steps:
            return self.final_lr
        progress = (step - self.warmup_steps) / (self.total_steps - self.warmup_steps)
        cosine = 0.5 * (1.0 + math.cos(math.pi * progress))  # 1 -> 0
        return self.final_lr + (self.peak_lr - self.final_lr) * cosine


def annealed_lr(schedule: LrSchedule, step: int, anneal_start_step: int, total_steps: int) -> float:
    """§3.4.3 annealing: ``schedule`` until ``anneal_start_step``, then linearly to 0.

    The rate at ``anneal_start_step`` is ``schedule.lr(anneal_start_step)``; it falls linearly
    to exactly 0.0 at ``total_steps`` and stays 0.0 after.
    """
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")
    if anneal_start_step < 0:
        raise ValueError(f"anneal_start_step must be >= 0, got {anneal_start_step}")
    if total_steps <= anneal_start_step:
        raise ValueError(
            f"total_steps ({total_steps}) must exceed anneal_start_step ({anneal_start_step})"
        )
    if step < anneal_start_step:
        return schedule.lr(step)
    if step >= total_steps:
        return 0.0
    start_lr = schedule.lr(anneal_start_step)
    return start_lr * (total_steps - step) / (total_steps - anneal_start_step)


# --------------------------------------------------------------------------------------------
# Batch-size ramp (§3.4.1)
# --------------------------------------------------------------------------------------------


class BatchStage(BaseModel):
    """One stage of a :class:`BatchRamp`: from ``tokens_seen_threshold`` on, use this batch."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    tokens_seen_threshold: NonNegativeInt
    """Tokens pre-trained on before this stage starts (the stage applies from this count on)."""
    batch_tokens: PositiveInt
    """Tokens per optimizer step; a whole number of sequences of ``seq_len``."""
    seq_len: PositiveInt
    """Sequence length (tokens) of each training sequence."""

    @model_validator(mode="after")
    def _check_whole_sequences(self) -> BatchStage:
        if self.batch_tokens % self.seq_len != 0:
            raise ValueError(
                f"batch_tokens ({self.batch_tokens}) must be a multiple of seq_len "
                f"({self.seq_len}) so each batch holds whole sequences"
            )
        return self

    @property
    def sequences_per_batch(self) -> int:
        """Number of sequences in one batch: ``batch_tokens // seq_len``."""
        return self.batch_tokens // self.seq_len


class BatchRamp(BaseModel):
    """Batch size and sequence length as a step function of the tokens seen so far."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    stages: tuple[BatchStage, ...] = Field(min_length=1)
    """Stages in order; the first has threshold 0 and thresholds strictly increase."""

    @model_validator(mode="after")
    def _check_thresholds(self) -> BatchRamp:
        first = self.stages[0].tokens_seen_threshold
        if first != 0:
            raise ValueError(
                f"stages[0].tokens_seen_threshold must be 0 so every token count has a batch "
                f"size, got {first}"
            )
        for index in range(1, len(self.stages)):
            before = self.stages[index - 1].tokens_seen_threshold
            after = self.stages[index].tokens_seen_threshold
            if after <= before:
                raise ValueError(
                    f"stages[{index}].tokens_seen_threshold ({after}) must exceed "
                    f"stages[{index - 1}].tokens_seen_threshold ({before}): thresholds must "
                    "strictly increase"
                )
        return self

    @classmethod
    def llama3_405b(cls) -> BatchRamp:
        """§3.4.1: 4M tokens of 4,096-token sequences; 8M of 8,192 after 252M tokens; 16M after
        2.87T tokens. Batch sizes in binary M (:data:`MI`), thresholds in decimal."""
        return cls(
            stages=(
                BatchStage(tokens_seen_threshold=0, batch_tokens=4 * MI, seq_len=4_096),
                BatchStage(tokens_seen_threshold=252_000_000, batch_tokens=8 * MI, seq_len=8_192),
                BatchStage(
                    tokens_seen_threshold=2_870_000_000_000, batch_tokens=16 * MI, seq_len=8_192
                ),
            )
        )

    def stage_at(self, tokens_seen: int) -> BatchStage:
        """The stage in force after ``tokens_seen`` tokens: the last one whose threshold is met."""
        if tokens_seen < 0:
            raise ValueError(f"tokens_seen must be >= 0, got {tokens_seen}")
        current = self.stages[0]
        for stage in self.stages[1:]:
            if tokens_seen < stage.tokens_seen_threshold:
                break
            current = stage
        return current

    def at(self, tokens_seen: int) -> tuple[int, int]:
        """``(batch_tokens, seq_len)`` to use after ``tokens_seen`` tokens."""
        stage = self.stage_at(tokens_seen)
        return stage.batch_tokens, stage.seq_len

    def scaled(self, factor: int, seq_len_divisor: int = 1) -> BatchRamp:
        """A scaled-down ramp for small runs, with the same shape.

        Every ``tokens_seen_threshold`` is floor-divided by ``factor`` and every
        ``batch_tokens`` divided exactly by ``factor``; sequence lengths are kept unless
        ``seq_len_divisor`` > 1, in which case each is divided exactly by it. Raises
        ``ValueError`` when a division is not exact, or when a scaled batch no longer holds
        whole sequences; choose a smaller ``factor`` or a larger ``seq_len_divisor``.
        """
        if factor < 1:
            raise ValueError(f"factor must be a positive integer, got {factor}")
        if seq_len_divisor < 1:
            raise ValueError(f"seq_len_divisor must be a positive integer, got {seq_len_divisor}")
        stages = []
        for index, stage in enumerate(self.stages):
            if stage.batch_tokens % factor != 0:
                raise ValueError(
                    f"factor ({factor}) must divide stages[{index}].batch_tokens "
                    f"({stage.batch_tokens}) exactly"
                )
            if stage.seq_len % seq_len_divisor != 0:
                raise ValueError(
                    f"seq_len_divisor ({seq_len_divisor}) must divide stages[{index}].seq_len "
                    f"({stage.seq_len}) exactly"
                )
            stages.append(
                BatchStage(
                    tokens_seen_threshold=stage.tokens_seen_threshold // factor,
                    batch_tokens=stage.batch_tokens // factor,
                    seq_len=stage.seq_len // seq_len_divisor,
                )
            )
        return BatchRamp(stages=tuple(stages))


# --------------------------------------------------------------------------------------------
# Context length (§3.4.2)
# --------------------------------------------------------------------------------------------


class ContextStage(BaseModel):
    """One stage of long-context pre-training: ``tokens`` tokens at sequence length ``seq_len``."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    tokens: PositiveInt
    """Tokens trained on in this stage (its duration, not a cumulative count)."""
    seq_len: PositiveInt
    """Context length (tokens per sequence) during this stage."""


class ContextSchedule(BaseModel):
    """Context length as a step function of the tokens seen in long-context pre-training.

    Stage ``i`` covers token counts ``[sum(tokens[:i]), sum(tokens[:i + 1]))``; after the last
    stage the last ``seq_len`` stays in force.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    stages: tuple[ContextStage, ...] = Field(min_length=1)
    """Stages in training order; ``seq_len`` strictly increases from one to the next."""

    @model_validator(mode="after")
    def _check_increasing(self) -> ContextSchedule:
        for index in range(1, len(self.stages)):
            before = self.stages[index - 1].seq_len
            after = self.stages[index].seq_len
            if after <= before:
                raise ValueError(
                    f"stages[{index}].seq_len ({after}) must exceed stages[{index - 1}].seq_len "
                    f"({before}): the context length grows in increments"
                )
        return self

    @classmethod
    def evenly(cls, total_tokens: int, seq_lens: tuple[int, ...]) -> ContextSchedule:
        """Split ``total_tokens`` evenly over ``seq_lens``; the remainder goes to the last stage."""
        if not seq_lens:
            raise ValueError("seq_lens must name at least one context length")
        if total_tokens < len(seq_lens):
            raise ValueError(
                f"total_tokens ({total_tokens}) must be at least one per stage ({len(seq_lens)})"
            )
        share, remainder = divmod(total_tokens, len(seq_lens))
        tokens = [share] * len(seq_lens)
        tokens[-1] += remainder
        return cls(
            stages=tuple(
                ContextStage(tokens=count, seq_len=seq_len)
                for count, seq_len in zip(tokens, seq_lens, strict=True)
            )
        )

    @classmethod
    def llama3(cls, total_tokens: int = 800_000_000_000) -> ContextSchedule:
        """§3.4.2: "six stages from 8K to 128K", about 800B tokens.

        The paper gives neither the intermediate lengths nor the per-stage token split. Our
        choice: 8K, 16K, 32K, 64K, 96K, 128K (doublings, then a 32K step to reach 128K in six
        stages), with the 800B tokens split evenly (:meth:`evenly`).
        """
        return cls.evenly(total_tokens, (8_192, 16_384, 32_768, 65_536, 98_304, 131_072))

    def as_ramp(self, batch_tokens: int, *, start_tokens: int = 0) -> BatchRamp:
        """The schedule as a `BatchRamp` the trainer runs (``data.ramp``): batches of
        `batch_tokens` tokens whose sequence length steps up at each stage's first token,
        counted from `start_tokens` (the tokens seen before long-context training, when the run
        continues a pre-training run; those come at the first stage's length).

        `batch_tokens` must hold whole sequences of every stage's length.
        """
        if start_tokens < 0:
            raise ValueError(f"start_tokens must be >= 0, got {start_tokens}")
        stages, seen = [], start_tokens
        for index, stage in enumerate(self.stages):
            if batch_tokens % stage.seq_len:
                raise ValueError(
                    f"batch_tokens ({batch_tokens}) is not a multiple of stages[{index}].seq_len "
                    f"({stage.seq_len}); use a multiple of "
                    f"{math.lcm(*(st.seq_len for st in self.stages))}"
                )
            threshold = 0 if index == 0 else seen
            stages.append(
                BatchStage(
                    tokens_seen_threshold=threshold,
                    batch_tokens=batch_tokens,
                    seq_len=stage.seq_len,
                )
            )
            seen += stage.tokens
        return BatchRamp(stages=tuple(stages))

    @property
    def total_tokens(self) -> int:
        """Tokens over all stages."""
        return sum(stage.tokens for stage in self.stages)

    def at(self, tokens_seen: int) -> int:
        """Context length to use after ``tokens_seen`` tokens of long-context pre-training."""
        if tokens_seen < 0:
            raise ValueError(f"tokens_seen must be >= 0, got {tokens_seen}")
        end = 0
        for stage in self.stages:
            end += stage.tokens
            if tokens_seen < end:
                return stage.seq_len
        return self.stages[-1].seq_len
