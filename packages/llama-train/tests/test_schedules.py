"""Tests for llama_train.schedules against the numbers of §3.4 of the Llama 3 paper.

Expected values are written out by hand from the paper's text, never computed by the code
under test.
"""

from __future__ import annotations

import itertools
import math

import pytest
from pydantic import ValidationError

from llama_train.schedules import (
    BatchRamp,
    BatchStage,
    ContextSchedule,
    ContextStage,
    LrSchedule,
    annealed_lr,
)

PEAK = 8e-5
FINAL = 8e-7


# ---------------------------------------------------------------- learning rate


def test_lr_is_zero_at_step_zero() -> None:
    """Warmup starts from a learning rate of exactly 0."""
    assert LrSchedule.llama3_405b().lr(0) == 0.0


def test_lr_is_half_peak_at_half_warmup() -> None:
    """At step 4,000 of the 8,000-step linear warmup the rate is 4e-5."""
    assert LrSchedule.llama3_405b().lr(4_000) == pytest.approx(4e-5, rel=1e-12)


def test_lr_is_peak_at_end_of_warmup() -> None:
    """At step 8,000 the rate is the paper's peak, 8e-5."""
    assert LrSchedule.llama3_405b().lr(8_000) == pytest.approx(8e-5, rel=1e-12)


def test_lr_is_mean_of_peak_and_final_at_cosine_midpoint() -> None:
    """Halfway through the cosine, step 8,000 + 1,192,000 / 2 = 604,000, the rate is 4.04e-5."""
    assert LrSchedule.llama3_405b().lr(604_000) == pytest.approx(4.04e-5, rel=1e-12)


def test_lr_reaches_final_at_total_steps() -> None:
    """At step 1,200,000 the rate is the paper's final 8e-7."""
    assert LrSchedule.llama3_405b().lr(1_200_000) == pytest.approx(8e-7, rel=1e-12)


def test_lr_stays_final_after_total_steps() -> None:
    """Past the end of the cosine the rate holds at 8e-7."""
    assert LrSchedule.llama3_405b().lr(5_000_000) == 8e-7


def test_lr_follows_cosine_at_a_quarter() -> None:
    """A quarter into the cosine the rate is final + (peak - final) * (1 + cos(pi/4)) / 2."""
    schedule = LrSchedule(peak_lr=1.0, warmup_steps=0, total_steps=400, final_lr=0.0)
    assert schedule.lr(100) == pytest.approx((1 + math.sqrt(0.5)) / 2, rel=1e-12)


def test_lr_without_warmup_starts_at_peak() -> None:
    """With warmup_steps=0 step 0 is already at peak."""
    schedule = LrSchedule(peak_lr=3e-4, warmup_steps=0, total_steps=10, final_lr=3e-5)
    assert schedule.lr(0) == pytest.approx(3e-4, rel=1e-12)


def test_lr_rejects_negative_step() -> None:
    """A negative step is an error naming the step."""
    with pytest.raises(ValueError, match="step"):
        LrSchedule.llama3_405b().lr(-1)


def test_lr_schedule_rejects_total_not_after_warmup() -> None:
    """total_steps <= warmup_steps is rejected, naming both fields."""
    with pytest.raises(ValidationError, match=r"total_steps.*warmup_steps"):
        LrSchedule(peak_lr=1e-3, warmup_steps=100, total_steps=100, final_lr=0.0)


def test_lr_schedule_rejects_final_above_peak() -> None:
    """final_lr above peak_lr is rejected, naming final_lr."""
    with pytest.raises(ValidationError, match="final_lr"):
        LrSchedule(peak_lr=1e-4, warmup_steps=0, total_steps=10, final_lr=1e-3)


def test_lr_schedule_rejects_nonpositive_peak() -> None:
    """peak_lr must be positive; the error names peak_lr."""
    with pytest.raises(ValidationError, match="peak_lr"):
        LrSchedule(peak_lr=0.0, warmup_steps=0, total_steps=10, final_lr=0.0)


def test_lr_schedule_forbids_unknown_fields() -> None:
    """A misspelled field is an error, not silently dropped."""
    with pytest.raises(ValidationError, match="warmup"):
        LrSchedule(peak_lr=1e-3, warmup=10, total_steps=100, final_lr=0.0)  # type: ignore[call-arg]


def test_lr_schedule_is_frozen() -> None:
    """Configs are immutable."""
    schedule = LrSchedule.llama3_405b()
    with pytest.raises(ValidationError):
        schedule.peak_lr = 1.0


# ---------------------------------------------------------------- annealing


def test_annealing_reaches_exactly_zero_at_end() -> None:
    """The annealed rate is exactly 0.0 at total_steps."""
    schedule = LrSchedule.llama3_405b()
    assert annealed_lr(schedule, 1_000, anneal_start_step=990, total_steps=1_000) == 0.0


def test_annealing_is_linear_from_start_rate() -> None:
    """Halfway through annealing the rate is half the rate at anneal start (here peak/2)."""
    schedule = LrSchedule(peak_lr=1.0, warmup_steps=10, total_steps=100, final_lr=0.0)
    # Anneal from step 10 (rate 1.0, the peak) to step 20: step 15 gives 0.5.
    assert annealed_lr(schedule, 15, anneal_start_step=10, total_steps=20) == pytest.approx(0.5)


def test_annealing_leaves_rate_untouched_before_start() -> None:
    """Before anneal_start_step the base schedule applies (step 4,000 -> 4e-5)."""
    schedule = LrSchedule.llama3_405b()
    rate = annealed_lr(schedule, 4_000, anneal_start_step=10_000, total_steps=10_010)
    assert rate == pytest.approx(4e-5, rel=1e-12)


def test_annealing_rejects_end_not_after_start() -> None:
    """total_steps must exceed anneal_start_step; the error names both."""
    with pytest.raises(ValueError, match=r"total_steps.*anneal_start_step"):
        annealed_lr(LrSchedule.llama3_405b(), 0, anneal_start_step=10, total_steps=10)


# ---------------------------------------------------------------- torch adapter


# ---------------------------------------------------------------- batch ramp


def test_batch_ramp_starts_at_4m_tokens_of_4096() -> None:
    """At 0 tokens: 4M = 4,194,304 tokens (1,024 sequences of 4,096)."""
    assert BatchRamp.llama3_405b().at(0) == (4_194_304, 4_096)


def test_batch_ramp_holds_until_252m() -> None:
    """One token before 252M the initial batch is still in force."""
    assert BatchRamp.llama3_405b().at(251_999_999) == (4_194_304, 4_096)


def test_batch_ramp_doubles_at_252m() -> None:
    """At 252M tokens the batch doubles to 8M tokens of 8,192-token sequences."""
    assert BatchRamp.llama3_405b().at(252_000_000) == (8_388_608, 8_192)


def test_batch_ramp_doubles_again_at_2_87t() -> None:
    """At 2.87T tokens the batch doubles again to 16M tokens, sequences stay 8,192."""
    assert BatchRamp.llama3_405b().at(2_870_000_000_000) == (16_777_216, 8_192)


def test_batch_ramp_first_batch_is_1024_sequences() -> None:
    """The initial batch holds 1,024 sequences, which is why M means 2**20."""
    assert BatchRamp.llama3_405b().stages[0].sequences_per_batch == 1_024


def test_batch_ramp_scaled_divides_thresholds_and_batches() -> None:
    """scaled(64) divides thresholds (floor) and batch tokens, keeping sequence lengths."""
    ramp = BatchRamp.llama3_405b().scaled(64)
    assert [(s.tokens_seen_threshold, s.batch_tokens, s.seq_len) for s in ramp.stages] == [
        (0, 65_536, 4_096),
        (3_937_500, 131_072, 8_192),
        (44_843_750_000, 262_144, 8_192),
    ]


def test_batch_ramp_scaled_can_shorten_sequences() -> None:
    """scaled(1024, seq_len_divisor=16) gives 4,096-token batches of 256-token sequences."""
    ramp = BatchRamp.llama3_405b().scaled(1_024, seq_len_divisor=16)
    assert ramp.at(0) == (4_096, 256)


def test_batch_ramp_scaled_rejects_partial_sequences() -> None:
    """Scaling a 4Mi batch by 2048 leaves 2,048 tokens, less than one 4,096 sequence."""
    with pytest.raises(ValidationError, match="seq_len"):
        BatchRamp.llama3_405b().scaled(2_048)


def test_batch_ramp_scaled_rejects_inexact_factor() -> None:
    """A factor that does not divide the batch size is an error naming factor."""
    with pytest.raises(ValueError, match="factor"):
        BatchRamp.llama3_405b().scaled(3)


def test_batch_ramp_rejects_nonincreasing_thresholds() -> None:
    """Thresholds that do not strictly increase are rejected, naming the field."""
    with pytest.raises(ValidationError, match="tokens_seen_threshold"):
        BatchRamp(
            stages=(
                BatchStage(tokens_seen_threshold=0, batch_tokens=8, seq_len=4),
                BatchStage(tokens_seen_threshold=100, batch_tokens=16, seq_len=4),
                BatchStage(tokens_seen_threshold=100, batch_tokens=32, seq_len=4),
            )
        )


def test_batch_ramp_rejects_nonzero_first_threshold() -> None:
    """The first stage must start at 0 tokens."""
    with pytest.raises(ValidationError, match="tokens_seen_threshold"):
        BatchRamp(stages=(BatchStage(tokens_seen_threshold=5, batch_tokens=8, seq_len=4),))


def test_batch_stage_rejects_partial_sequences() -> None:
    """batch_tokens that is not a multiple of seq_len is rejected, naming both."""
    with pytest.raises(ValidationError, match=r"batch_tokens.*seq_len"):
        BatchStage(tokens_seen_threshold=0, batch_tokens=10, seq_len=4)


def test_batch_ramp_rejects_negative_tokens_seen() -> None:
    """A negative token count is an error naming tokens_seen."""
    with pytest.raises(ValueError, match="tokens_seen"):
        BatchRamp.llama3_405b().at(-1)


# ---------------------------------------------------------------- context length


def test_context_schedule_has_six_stages_from_8k_to_128k() -> None:
    """Six stages, strictly increasing, first 8,192 and last 131,072."""
    lengths = [stage.seq_len for stage in ContextSchedule.llama3().stages]
    assert len(lengths) == 6
    assert lengths[0] == 8_192
    assert lengths[-1] == 131_072
    assert all(a < b for a, b in itertools.pairwise(lengths))


def test_context_schedule_covers_800b_tokens() -> None:
    """The stages add up to the paper's ~800B tokens."""
    assert ContextSchedule.llama3().total_tokens == 800_000_000_000


def test_context_schedule_splits_evenly() -> None:
    """800B over 6 stages: 133,333,333,333 each, the last gets the remainder 2 more."""
    tokens = [stage.tokens for stage in ContextSchedule.llama3().stages]
    assert tokens == [133_333_333_333] * 5 + [133_333_333_335]


def test_context_schedule_at_stage_boundaries() -> None:
    """A stage's length applies up to one token before the next stage starts."""
    schedule = ContextSchedule(
        stages=(ContextStage(tokens=10, seq_len=8), ContextStage(tokens=20, seq_len=16))
    )
    assert [schedule.at(t) for t in (0, 9, 10, 29, 30, 1_000)] == [8, 8, 16, 16, 16, 16]


def test_context_schedule_rejects_non_increasing_lengths() -> None:
    """A stage shorter than the one before is rejected, naming seq_len."""
    with pytest.raises(ValidationError, match="seq_len"):
        ContextSchedule(
            stages=(ContextStage(tokens=10, seq_len=16), ContextStage(tokens=10, seq_len=8))
        )


def test_context_stage_rejects_zero_tokens() -> None:
    """A stage of 0 tokens is rejected, naming tokens."""
    with pytest.raises(ValidationError, match="tokens"):
        ContextStage(tokens=0, seq_len=8)


def test_context_schedule_as_ramp_steps_the_length_at_each_stage() -> None:
    """§3.4.2 through the trainer's batch ramp: the length steps up at each stage's first token,
    counted after the pre-training tokens, with a constant batch of whole sequences."""
    schedule = ContextSchedule.llama3()
    batch = 16 * 393_216  # 393,216 = lcm of the six lengths (98,304 = 3 · 32,768)
    ramp = schedule.as_ramp(batch, start_tokens=15_000_000_000_000)
    share = 800_000_000_000 // 6
    assert [s.seq_len for s in ramp.stages] == [8_192, 16_384, 32_768, 65_536, 98_304, 131_072]
    assert [s.tokens_seen_threshold for s in ramp.stages] == [
        0,
        *(15_000_000_000_000 + k * share for k in range(1, 6)),
    ]
    assert ramp.at(15_000_000_000_000 + share - 1) == (batch, 8_192)
    assert ramp.at(15_000_000_000_000 + share) == (batch, 16_384)
    assert ramp.at(10**15) == (batch, 131_072)
    with pytest.raises(
        ValueError, match=r"batch_tokens \(100000\) is not a multiple of stages\[0\].*of 393216"
    ):
        schedule.as_ramp(100_000)
