"""Rejection sampling (§4.1.3 of "The Llama 3 Herd of Models", arXiv 2407.21783).

For each prompt, draw K answers from the latest model, score each with the reward model and keep
the best as SFT data (§4.1.3: "we sample K (typically between 10 and 30) outputs from the latest
chat model policy ... and use our reward model to select the best candidate"). The K samples of a
prompt are one request with ``n=K``, so the engine prefills the prompt once and its KV cache
blocks are shared by the K samples (§4.1.3, §4.2.2: PagedAttention for rejection sampling).

What is never kept, counted under its reason with examples (`SamplingReport`):

- samples: ``"truncated"`` (finish_reason "length": a cut-off answer), ``"empty"`` (no text but
  whitespace and no tool call), ``"special token"`` (a special token such as
  ``<|start_header_id|>`` inside the reply: stored as text it would not round-trip through the
  chat format), ``"failed"`` (any other finish_reason);
- prompts: ``"prompt too long"`` (prompt + max_tokens exceed the sampler's context),
  ``"no valid sample"`` (every sample rejected), ``"below threshold"`` (the best reward is below
  `SamplingSettings.min_reward`);
- pairs (``pairs=True``): ``"one valid sample"`` and ``"equal rewards"`` (no preference to learn).

The report also compares the mean reward of the kept answers with the mean reward of one valid
sample per kept prompt drawn at random (seeded): what selecting the best of K bought.

The sampler is a seam (`Sampler`): `EngineSampler` draws through `llama_serve.Engine`; another
backend (vLLM) only has to turn prompt token ids into K `Completion`s each.
"""

from __future__ import annotations

import math
import random
from collections.abc import Iterable, Iterator, Sequence, Sized
from dataclasses import dataclass, field
from itertools import islice
from typing import Any, NamedTuple, Protocol, Self

from pydantic import BaseModel, ConfigDict, Field, model_validator

from llama_align.data import DataReport, PreferenceRow, PromptRow, SftRow, encode_prompt
from llama_model import ChatFormat, Message
from llama_serve import Engine, SamplingParams

__all__ = [
    "SamplingSettings",
    "Scorer",
    "Sampler",
    "Completion",
    "EngineSampler",
    "SamplingReport",
    "SamplingResult",
    "rejection_sample",
]

DEFAULT_K = 10  # §4.1.3: "K (typically between 10 and 30)"; the low end, the cheapest
# Meta's Llama 3.1 Instruct generation_config.json (the paper fixes no sampling temperature).
META_TEMPERATURE = 0.6
META_TOP_P = 0.9


class SamplingSettings(BaseModel):
    """How rejection sampling draws and selects answers (§4.1.3). Frozen; unknown keys are errors
    (pydantic's `ValidationError`, a `ValueError`; `llama_model.format_validation_error` prints it
    one line per field, also when these settings sit inside a stage config)."""

    model_config = ConfigDict(frozen=True, extra="forbid", use_attribute_docstrings=True)

    k: int = Field(default=DEFAULT_K, ge=1)
    """Samples per prompt. §4.1.3: "K (typically between 10 and 30)"; default 10."""

    temperature: float = Field(default=META_TEMPERATURE, ge=0.0, allow_inf_nan=False)
    """Softmax temperature of the samples. The paper does not give one; 0.6 is Meta's default for
    Llama 3.1 Instruct (its `generation_config.json`). 0 is greedy, allowed only with k = 1."""

    top_p: float = Field(default=META_TOP_P, gt=0.0, le=1.0)
    """Nucleus sampling mass. The paper does not give one; 0.9 is Meta's default for Llama 3.1
    Instruct (its `generation_config.json`)."""

    max_tokens: int = Field(default=1024, ge=1)
    """The most tokens per answer (our default; the paper gives none). An answer cut off here is
    rejected as "truncated", never kept."""

    seed: int = Field(default=0, ge=0)
    """Base seed: prompt i (its position in the input) samples with seed ``seed + i * k`` (sample
    j of it with ``seed + i * k + j``, the engine's convention), and its random baseline sample
    is drawn from a generator seeded by (seed, i). Same seed, model, scorer and prompts: same
    result, however the prompts are batched."""

    min_reward: float | None = Field(default=None, allow_inf_nan=False)
    """Drop a prompt whose best answer scores below this ("below threshold"). None: keep the
    best answer whatever its reward."""

    pairs: bool = False
    """Also make a preference row per kept prompt: its best answer (chosen) against its worst
    valid one (rejected). Needs k >= 2."""

    prompts_per_batch: int = Field(default=32, ge=1)
    """Prompts sent to the sampler at once (each with k samples); bounds the memory held by
    outputs in flight. The result does not depend on it."""

    @model_validator(mode="after")
    def _check_combination(self) -> Self:
        if self.temperature < 1e-5 and self.k > 1:  # vLLM's and the engine's greedy threshold
            raise ValueError(
                f"temperature {self.temperature} is greedy decoding: the k = {self.k} samples "
                "would all be the same answer; set temperature > 0 (Meta's default is 0.6) or k = 1"
            )
        if self.pairs and self.k < 2:
            raise ValueError(
                f"pairs = true needs k >= 2 (best against worst of the samples), got k = {self.k}"
            )
        return self


class Scorer(Protocol):
    """A reward model: one score per response to `prompt` (higher is better).

    `llama_align.reward.RewardScorer` is one; any function of this shape is another.
    """

    def __call__(
        self, prompt: Sequence[Message], responses: Sequence[Sequence[Message]], /
    ) -> list[float]:
        """The reward of each response (a list of assistant messages) to the dialog `prompt`."""
        ...


class Completion(NamedTuple):
    """One sampled answer: the generated token ids (the stop token included) and why it ended
    ("stop", "length", or anything else a backend reports)."""

    token_ids: list[int]
    finish_reason: str


class Sampler(Protocol):
    """Draws `settings.k` answers per prompt: the seam between rejection sampling and a backend
    (`EngineSampler` for `llama_serve.Engine`; a vLLM one would do the same)."""

    @property
    def max_model_len(self) -> int:
        """The most tokens (prompt + answer) of one sequence."""
        ...

    def sample(
        self,
        prompt_tokens: Sequence[Sequence[int]],
        seeds: Sequence[int],
        settings: SamplingSettings,
    ) -> list[list[Completion]]:
        """`settings.k` completions of each prompt (token ids, passed as they are), sample j of
        prompt i drawn with seed ``seeds[i] + j``, in prompt order."""
        ...


class EngineSampler:
    """`Sampler` over a `llama_serve.Engine`: each prompt is one request with ``n=k``, so its KV
    cache blocks are prefilled once and shared by its k samples."""

    def __init__(self, engine: Engine) -> None:
        """Sample with `engine`; it must stop on the chat format's terminators (its
        `eos_token_ids`, which default to the tokenizer's stop tokens)."""
        if not engine.eos_token_ids:
            raise ValueError(
                "the engine has no end-of-sequence token ids: every sample would run to "
                "max_tokens and be rejected as truncated; build it with a tokenizer or "
                "eos_token_ids (e.g. <|eot_id|>, <|eom_id|>)"
            )
        self.engine = engine

    @property
    def max_model_len(self) -> int:
        """The engine's most tokens per sequence."""
        return self.engine.max_model_len

    @staticmethod
    def params(seed: int, settings: SamplingSettings) -> SamplingParams:
        """The request's parameters: n = k samples, seeded `seed` (sample j: seed + j)."""
        return SamplingParams(
            n=settings.k,
            temperature=settings.temperature,
            top_p=settings.top_p,
            max_tokens=settings.max_tokens,
            seed=seed,
        )

    def sample(
        self,
        prompt_tokens: Sequence[Sequence[int]],
        seeds: Sequence[int],
        settings: SamplingSettings,
    ) -> list[list[Completion]]:
        """`settings.k` completions per prompt, from one engine request per prompt."""
        if not prompt_tokens:
            return []
        params = [self.params(seed, settings) for seed in seeds]
        outputs = self.engine.generate([list(tokens) for tokens in prompt_tokens], params)
        return [
            [
                Completion(list(sample.token_ids), sample.finish_reason or "unfinished")
                for sample in sorted(output.outputs, key=lambda sample: sample.index)
            ]
            for output in outputs
        ]


@dataclass
class SamplingReport:
    """What rejection sampling drew, kept and rejected, and what selection bought."""

    prompts: int = 0
    """Prompts read."""
    samples: int = 0
    """Answers drawn (k per prompt that was sampled)."""
    valid: int = 0
    """Answers that passed every sample check and were scored."""
    kept: int = 0
    """Prompts whose best answer became an SFT row."""
    pairs: int = 0
    """Preference rows made (``pairs=True``)."""
    rejected_samples: DataReport = field(default_factory=DataReport)
    """Answers rejected, by reason ("truncated", "empty", "special token", "failed"); `used` is
    `valid`."""
    dropped_prompts: DataReport = field(default_factory=DataReport)
    """Prompts with no SFT row, by reason ("prompt too long", "no valid sample", "below
    threshold"); `used` is `kept`."""
    skipped_pairs: DataReport = field(default_factory=DataReport)
    """Kept prompts with no preference row, by reason ("one valid sample", "equal rewards");
    `used` is `pairs`. Empty unless ``pairs=True``."""
    mean_kept_reward: float | None = None
    """Mean reward of the kept answers (None when nothing was kept)."""
    mean_random_reward: float | None = None
    """Mean reward, over the same kept prompts, of one valid answer per prompt chosen at random
    (seeded): what one sample without selection would score."""

    def summary(self) -> str:
        """A few lines for a log: the counts, the rejections by reason, the two mean rewards."""
        lines = [
            f"rejection sampling: {self.prompts} prompts, {self.samples} samples, "
            f"{self.valid} valid, {self.kept} kept"
            + (f", {self.pairs} pairs" if self.pairs else "")
        ]
        for title, report in (
            ("rejected samples", self.rejected_samples),
            ("dropped prompts", self.dropped_prompts),
            ("skipped pairs", self.skipped_pairs),
        ):
            for reason, count in report.dropped.most_common():
                examples = "; ".join(report.examples[reason])
                lines.append(f"  {title}: {reason}: {count} (e.g. {examples})")
        if self.mean_kept_reward is not None and self.mean_random_reward is not None:
            lines.append(
                f"  mean reward: kept {self.mean_kept_reward:.4f}, "
                f"random sample {self.mean_random_reward:.4f}"
            )
        return "\n".join(lines)

    def as_dict(self) -> dict[str, Any]:
        """Plain data for a stage's report file."""
        return {
            "prompts": self.prompts,
            "samples": self.samples,
            "valid": self.valid,
            "kept": self.kept,
            "pairs": self.pairs,
            "rejected_samples": self.rejected_samples.as_dict(),
            "dropped_prompts": self.dropped_prompts.as_dict(),
            "skipped_pairs": self.skipped_pairs.as_dict(),
            "mean_kept_reward": self.mean_kept_reward,
            "mean_random_reward": self.mean_random_reward,
        }


@dataclass
class SamplingResult:
    """The kept answers as SFT rows (in prompt order), their rewards, the preference rows
    (``pairs=True``) and the report."""

    sft: list[SftRow] = field(default_factory=list)
    rewards: list[float] = field(default_factory=list)
    """The reward of each row of `sft`."""
    pairs: list[PreferenceRow] = field(default_factory=list)
    report: SamplingReport = field(default_factory=SamplingReport)


def rejection_sample(
    sampler: Engine | Sampler,
    scorer: Scorer,
    chat_format: ChatFormat,
    prompts: Iterable[PromptRow],
    settings: SamplingSettings | None = None,
    *,
    progress: bool = True,
) -> SamplingResult:
    """Draw `settings.k` answers per prompt, score them with `scorer` and keep the best (§4.1.3).

    Prompts are encoded with `llama_align.encode_prompt` (the chat format, up to the assistant
    header) and sent as token ids; answers are decoded with `ChatFormat.decode_assistant`. Only
    valid answers are scored (one `scorer` call per prompt with all of them); the best is the
    first of the highest reward, the worst (for ``pairs``) the first of the lowest. Prompts go to
    the sampler `settings.prompts_per_batch` at a time, with a tqdm bar if `progress`.
    """
    settings = settings if settings is not None else SamplingSettings()
    if isinstance(sampler, Engine):
        sampler = EngineSampler(sampler)
    total = len(prompts) if isinstance(prompts, Sized) else None
    result = SamplingResult()
    random_rewards: list[float] = []
    bar = _progress_bar(total, progress)
    try:
        for batch in _batches(enumerate(prompts), settings.prompts_per_batch):
            _sample_batch(sampler, scorer, chat_format, batch, settings, result, random_rewards)
            bar.update(len(batch))
            bar.set_postfix(kept=result.report.kept, refresh=False)
    finally:
        bar.close()
    report = result.report
    if result.rewards:
        report.mean_kept_reward = math.fsum(result.rewards) / len(result.rewards)
        report.mean_random_reward = math.fsum(random_rewards) / len(random_rewards)
    return result


def _sample_batch(
    sampler: Sampler,
    scorer: Scorer,
    chat: ChatFormat,
    batch: list[tuple[int, PromptRow]],
    settings: SamplingSettings,
    result: SamplingResult,
    random_rewards: list[float],
) -> None:
    """Sample, check, score and select for one batch of (input position, prompt)."""
    report = result.report
    report.prompts += len(batch)
    todo: list[tuple[int, PromptRow, list[int]]] = []
    for index, row in batch:
        if not isinstance(row, PromptRow):
            raise TypeError(f"prompt {index} is a {type(row).__name__}, expected a PromptRow")
        tokens = encode_prompt(chat, row.messages).tokens
        needed = len(tokens) + settings.max_tokens
        if needed > sampler.max_model_len:
            report.dropped_prompts.drop(
                "prompt too long",
                f"prompt {index}: {len(tokens)} tokens + max_tokens {settings.max_tokens} > "
                f"{sampler.max_model_len}",
            )
            continue
        todo.append((index, row, tokens))
    seeds = [settings.seed + index * settings.k for index, _, _ in todo]
    drawn = sampler.sample([tokens for _, _, tokens in todo], seeds, settings)
    if len(drawn) != len(todo) or any(len(c) != settings.k for c in drawn):
        got = [len(c) for c in drawn]
        raise RuntimeError(
            f"the sampler returned {got} completions for {len(todo)} prompts of k = {settings.k}"
        )
    specials = frozenset(chat.tokenizer.special_tokens.values())
    for (index, row, _), completions in zip(todo, drawn, strict=True):
        report.samples += len(completions)
        replies: list[Message] = []
        for number, completion in enumerate(completions):
            reply, reason, detail = _check(chat, completion, specials)
            if reply is None:
                report.rejected_samples.drop(reason, f"prompt {index} sample {number}: {detail}")
                continue
            replies.append(reply)
        report.valid += len(replies)
        report.rejected_samples.used += len(replies)
        if not replies:
            report.dropped_prompts.drop(
                "no valid sample", f"prompt {index}: all {settings.k} samples rejected"
            )
            continue
        rewards = _score(scorer, row.messages, replies, index)
        best = max(range(len(rewards)), key=rewards.__getitem__)  # the first of the highest
        if settings.min_reward is not None and rewards[best] < settings.min_reward:
            report.dropped_prompts.drop(
                "below threshold",
                f"prompt {index}: best reward {rewards[best]:.4g} < min_reward "
                f"{settings.min_reward}",
            )
            continue
        baseline = random.Random(f"rejection sampling baseline {settings.seed} {index}")
        random_rewards.append(rewards[baseline.randrange(len(rewards))])
        result.sft.append(SftRow(messages=[*row.messages, replies[best]]))
        result.rewards.append(rewards[best])
        report.kept += 1
        report.dropped_prompts.used += 1
        if settings.pairs:
            _pair(result, row, replies, rewards, best, index)


def _check(
    chat: ChatFormat, completion: Completion, specials: frozenset[int]
) -> tuple[Message | None, str, str]:
    """The reply as an assistant message, or None, the reason it is rejected and a detail."""
    tokens, finish_reason = completion
    if finish_reason == "length":
        return None, "truncated", f"cut off after {len(tokens)} tokens"
    if finish_reason != "stop":
        return None, "failed", f"finish_reason {finish_reason!r}"
    tok = chat.tokenizer
    body = tokens[:-1] if tokens and tokens[-1] in (tok.eot_id, tok.eom_id, tok.eos_id) else tokens
    body = body[1:] if body and body[0] == tok.python_tag_id else body
    inside = [token for token in body if token in specials]
    if inside:
        return None, "special token", f"{tok.decode(inside[:1])} (id {inside[0]}) in the reply"
    reply = chat.decode_assistant(tokens)
    if not reply.content.strip() and not reply.tool_calls:
        return None, "empty", f"tokens {tokens[:8]}"
    return reply, "", ""


def _score(
    scorer: Scorer, prompt: Sequence[Message], replies: Sequence[Message], index: int
) -> list[float]:
    """The scorer's rewards for `replies`, checked: one finite number per reply."""
    rewards = [float(r) for r in scorer(prompt, [[reply] for reply in replies])]
    if len(rewards) != len(replies):
        raise ValueError(
            f"prompt {index}: the scorer returned {len(rewards)} rewards for {len(replies)} "
            "responses; it must return one per response"
        )
    bad = [r for r in rewards if not math.isfinite(r)]
    if bad:
        raise ValueError(f"prompt {index}: the scorer returned a non-finite reward {bad[0]}")
    return rewards


def _pair(
    result: SamplingResult,
    row: PromptRow,
    replies: list[Message],
    rewards: list[float],
    best: int,
    index: int,
) -> None:
    """Best against worst as a preference row, or the reason there is none."""
    skipped = result.report.skipped_pairs
    if len(replies) < 2:
        skipped.drop("one valid sample", f"prompt {index}")
        return
    worst = min(range(len(rewards)), key=rewards.__getitem__)  # the first of the lowest
    if rewards[worst] == rewards[best]:
        skipped.drop("equal rewards", f"prompt {index}: every valid sample scored {rewards[best]}")
        return
    result.pairs.append(
        PreferenceRow(prompt=row.messages, chosen=[replies[best]], rejected=[replies[worst]])
    )
    result.report.pairs += 1
    skipped.used += 1


def _batches(items: Iterable[tuple[int, PromptRow]], size: int) -> Iterator[list[Any]]:
    iterator = iter(items)
    while batch := list(islice(iterator, size)):
        yield batch


class _Bar(Protocol):
    def update(self, n: int) -> object: ...
    def set_postfix(self, *, kept: int, refresh: bool) -> object: ...
    def close(self) -> object: ...


def _progress_bar(total: int | None, enabled: bool) -> _Bar:
    from tqdm import tqdm

    bar: _Bar = tqdm(total=total, desc="rejection sampling", unit="prompt", disable=not enabled)
    return bar
