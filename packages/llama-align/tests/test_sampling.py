"""Rejection sampling (§4.1.3): K samples per prompt from one engine request, the best kept.

A tiny random Llama (2 layers, dim 64, the real vocabulary) served by `llama_serve.Engine`. A
random model almost never says `<|eot_id|>`, so the engine also stops on every 8th token id:
samples end at random lengths, some cut off at max_tokens. The oracle re-reads the engine's own
outputs (recorded on the way) and scores every sample itself.
"""

from __future__ import annotations

import zlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import pytest
import torch
from pydantic import ValidationError

from llama_align.data import PromptRow, encode_prompt, encode_response
from llama_align.sampling import (
    Completion,
    EngineSampler,
    SamplingResult,
    SamplingSettings,
    Scorer,
    rejection_sample,
)
from llama_model import ChatFormat, Llama, LlamaConfig, Message, Tokenizer, format_validation_error
from llama_serve import Engine, EngineConfig, RequestOutput, SamplingParams

TINY = LlamaConfig.model_validate(  # the spec's tiny model (ffn_dim is derived)
    {"dim": 64, "n_layers": 2, "n_heads": 2, "n_kv_heads": 1, "multiple_of": 32}
    | {"max_seq_len": 512, "rope_scaling": None}
)
K = 6
# top_p 1: llama_serve's nucleus filter sorts the 128k vocabulary per row and token, which
# dominates a tiny model's step on a CPU; the selection logic does not depend on it.
FAST: dict[str, Any] = {"k": K, "temperature": 1.0, "top_p": 1.0, "max_tokens": 16}


def settings(**fields: Any) -> SamplingSettings:
    """`FAST` settings with `fields` changed."""
    return SamplingSettings(**{**FAST, **fields})


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    return Tokenizer.llama3()


@pytest.fixture(scope="module")
def chat(tokenizer: Tokenizer) -> ChatFormat:
    return ChatFormat(tokenizer)


@pytest.fixture(scope="module")
def model() -> Llama:
    torch.manual_seed(0)
    model = Llama(TINY)
    model.init_weights(seed=0)
    return model


@pytest.fixture(scope="module")
def engine(model: Llama, tokenizer: Tokenizer) -> Engine:
    stops = set(tokenizer.stop_tokens) | set(range(0, 128_000, 8))
    return Engine(model, tokenizer, EngineConfig(block_size=16), eos_token_ids=stops)


PROMPTS = [
    PromptRow(messages=[Message(role="user", content="What is 2 + 2?")]),
    PromptRow(
        messages=[
            Message(role="system", content="Answer briefly."),
            Message(role="user", content="Name a prime number."),
        ]
    ),
    PromptRow(messages=[Message(role="user", content="Say hello.")]),
    PromptRow(messages=[Message(role="user", content="Why is the sky blue?")]),
]


def text_reward(prompt: Sequence[Message], responses: Sequence[Sequence[Message]]) -> list[float]:
    """A deterministic reward of the reply's text: its CRC32 scaled to [0, 1)."""
    return [zlib.crc32(response[0].content.encode()) / 2**32 for response in responses]


class TinyRewardModel:
    """A real reward model: the tiny Llama's last hidden state through a linear head (float32)."""

    def __init__(self, model: Llama, chat: ChatFormat) -> None:
        self.model, self.chat = model, chat
        torch.manual_seed(1)
        self.head = torch.nn.Linear(TINY.dim, 1)

    @torch.no_grad()
    def __call__(
        self, prompt: Sequence[Message], responses: Sequence[Sequence[Message]]
    ) -> list[float]:
        prompt_tokens = encode_prompt(self.chat, prompt).tokens
        rewards = []
        for response in responses:
            tokens = prompt_tokens + encode_response(self.chat, prompt, response).tokens
            hidden = self.model.hidden_states(torch.tensor([tokens]))  # [1, T, dim]
            rewards.append(float(self.head(hidden[0, -1])))
        return rewards


@dataclass
class Run:
    """One `rejection_sample` call and what the engine did for it."""

    result: SamplingResult
    calls: list[tuple[list[Any], list[SamplingParams], list[RequestOutput]]]
    """Every `engine.generate` call: its prompts, params and outputs."""
    prompt_positions: int
    """Prompt positions the engine prefilled or took from its prefix cache."""

    def outputs(self) -> list[RequestOutput]:
        return [output for _, _, outputs in self.calls for output in outputs]


def record_run(engine: Engine, scorer: Scorer, chat: ChatFormat, settings: SamplingSettings) -> Run:
    """`rejection_sample` over `PROMPTS`, recording the engine's calls on the way."""
    generate = engine.generate
    calls: list[tuple[list[Any], list[SamplingParams], list[RequestOutput]]] = []

    def recording(prompts: Any, params: Any, **options: Any) -> list[RequestOutput]:
        outputs = generate(prompts, params, **options)
        calls.append((list(prompts), list(params), outputs))
        return outputs

    before = dict(engine.stats)
    engine.generate = recording  # type: ignore[method-assign, assignment]
    try:
        result = rejection_sample(engine, scorer, chat, PROMPTS, settings, progress=False)
    finally:
        del engine.generate  # the class's method again
    positions = sum(engine.stats[k] - before[k] for k in ("prefill_tokens", "cached_tokens"))
    return Run(result, calls, positions)


TEXT_RUN = {"seed": 5, "prompts_per_batch": 3, "pairs": True}


@pytest.fixture(scope="module")
def text_run(engine: Engine, chat: ChatFormat) -> Run:
    """The run most tests read: the text reward, seed 5, prompts in batches of 3."""
    return record_run(engine, text_reward, chat, settings(**TEXT_RUN))


def valid_replies(chat: ChatFormat, output: RequestOutput) -> list[Message]:
    """The oracle's valid samples: stopped (not cut off), no special token inside, not empty."""
    tok = chat.tokenizer
    specials = set(tok.special_tokens.values())
    replies = []
    for sample in output.outputs:
        ids = sample.token_ids
        body = ids[:-1] if ids[-1] in tok.stop_tokens else ids
        if sample.finish_reason != "stop" or specials & set(body):
            continue
        reply = chat.decode_assistant(ids)
        if reply.content.strip() or reply.tool_calls:
            replies.append(reply)
    return replies


def test_k_samples_of_a_prompt_are_one_request_with_n_k(chat: ChatFormat, text_run: Run) -> None:
    """Each prompt is one engine request with n=K (K outputs), its tokens exactly
    `encode_prompt`'s, seeded seed + i*K, and its prompt prefilled once for the K samples."""
    prompts = [p for prompts, _, _ in text_run.calls for p in prompts]
    params = [p for _, params, _ in text_run.calls for p in params]
    assert [len(prompts) for prompts, _, _ in text_run.calls] == [3, 1]  # bounded batches
    assert prompts == [encode_prompt(chat, row.messages).tokens for row in PROMPTS]
    assert [(p.n, p.seed) for p in params] == [(K, 5 + i * K) for i in range(len(PROMPTS))]
    assert [len(output.outputs) for output in text_run.outputs()] == [K] * len(PROMPTS)
    assert text_run.prompt_positions == sum(map(len, prompts))  # once per prompt, not K times
    assert text_run.result.report.prompts == len(PROMPTS)
    assert text_run.result.report.samples == K * len(PROMPTS)


@pytest.mark.parametrize("scorer_name", ["text", "tiny reward model"])
def test_kept_answer_is_the_argmax_reward_of_the_valid_samples(
    engine: Engine, chat: ChatFormat, model: Llama, text_run: Run, scorer_name: str
) -> None:
    """The kept reply of every prompt is the valid sample of highest reward (oracle: every
    sample of the engine's outputs scored here), and its reward is reported."""
    scorer: Scorer = text_reward
    run = text_run
    if scorer_name == "tiny reward model":
        scorer = TinyRewardModel(model, chat)
        run = record_run(engine, scorer, chat, settings(**TEXT_RUN))
    expected, expected_rewards = [], []
    for row, output in zip(PROMPTS, run.outputs(), strict=True):
        replies = valid_replies(chat, output)
        if not replies:
            continue
        rewards = scorer(row.messages, [[reply] for reply in replies])
        best = max(range(len(replies)), key=lambda i: rewards[i])
        expected.append([*row.messages, replies[best]])
        expected_rewards.append(rewards[best])
    assert expected, "no prompt had a valid sample: the test proves nothing"
    assert [row.messages for row in run.result.sft] == expected
    assert run.result.rewards == pytest.approx(expected_rewards, abs=1e-6)
    assert run.result.report.valid == sum(len(valid_replies(chat, o)) for o in run.outputs())


def test_truncated_samples_are_counted_and_never_kept(engine: Engine, chat: ChatFormat) -> None:
    """With max_tokens 1 most samples are cut off: each is counted "truncated", none is kept,
    and a prompt whose samples were all rejected is counted "no valid sample"."""
    run = record_run(engine, text_reward, chat, settings(max_tokens=1, seed=2))
    result, outputs = run.result, run.outputs()
    cut = [[s for s in o.outputs if s.finish_reason == "length"] for o in outputs]
    report = result.report
    assert report.rejected_samples.dropped["truncated"] == sum(map(len, cut)) > 0
    cut_replies = [chat.decode_assistant(s.token_ids) for samples in cut for s in samples]
    assert not [row for row in result.sft if row.messages[-1] in cut_replies]
    no_valid = sum(not valid_replies(chat, o) for o in outputs)
    assert report.dropped_prompts.dropped["no valid sample"] == no_valid > 0
    assert report.kept == len(PROMPTS) - no_valid
    assert len(report.rejected_samples.examples["truncated"]) == 3  # with file-like places
    assert report.rejected_samples.examples["truncated"][0].startswith("prompt 0 sample ")


def test_kept_mean_reward_beats_a_random_sample(chat: ChatFormat, text_run: Run) -> None:
    """Keeping the best of K scores higher on average than one random valid sample per prompt
    (strictly here: rewards vary), which itself lies between the worst and the best (oracle)."""
    report = text_run.result.report
    lowest, highest = [], []
    for row, output in zip(PROMPTS, text_run.outputs(), strict=True):
        replies = valid_replies(chat, output)
        if replies:
            rewards = text_reward(row.messages, [[reply] for reply in replies])
            lowest.append(min(rewards))
            highest.append(max(rewards))
    assert report.mean_kept_reward is not None and report.mean_random_reward is not None
    assert report.mean_kept_reward == pytest.approx(sum(highest) / len(highest), abs=1e-12)
    assert sum(lowest) / len(lowest) - 1e-12 <= report.mean_random_reward
    assert report.mean_random_reward < report.mean_kept_reward
    assert "mean reward: kept" in report.summary()


def test_same_seed_same_result_other_seed_other_samples(
    engine: Engine, chat: ChatFormat, text_run: Run
) -> None:
    """The same seed gives the same rows, rewards, pairs and report, however the prompts are
    batched (run again, one prompt per batch); another seed draws other samples."""

    def rows(run: Run) -> Any:
        result = run.result
        return result.sft, result.rewards, result.pairs, result.report.as_dict()

    again = record_run(engine, text_reward, chat, settings(**{**TEXT_RUN, "prompts_per_batch": 1}))
    assert rows(again) == rows(text_run)
    other = record_run(engine, text_reward, chat, settings(**{**TEXT_RUN, "seed": 6}))
    assert rows(other)[0] != rows(text_run)[0]


class FakeSampler:
    """Returns fixed completions (token ids), whatever the prompt: for the sample checks."""

    max_model_len = 512

    def __init__(self, completions: list[Completion]) -> None:
        self.completions = completions

    def sample(
        self, prompt_tokens: Sequence[Sequence[int]], seeds: Sequence[int], settings: Any
    ) -> list[list[Completion]]:
        return [list(self.completions) for _ in prompt_tokens]


def reply_tokens(tokenizer: Tokenizer, text: str) -> list[int]:
    return [*tokenizer.encode(text, bos=False, eos=False), tokenizer.eot_id]


def test_every_rejected_sample_is_counted_under_its_reason(
    chat: ChatFormat, tokenizer: Tokenizer
) -> None:
    """Empty (no text but whitespace, no tool call), truncated, a special token inside, and a
    failed sample are each counted under their reason and never kept; a tool call is valid."""
    tok = tokenizer
    call = '{"name": "get_weather", "parameters": {"city": "Paris"}}'
    completions = [
        Completion([tok.eot_id], "stop"),  # empty
        Completion(reply_tokens(tok, "  \n"), "stop"),  # whitespace: empty
        Completion(tok.encode("cut off", bos=False, eos=False), "length"),
        Completion(
            [*tok.encode("a", bos=False, eos=False), tok.start_header_id, tok.eot_id], "stop"
        ),
        Completion(reply_tokens(tok, "aborted"), "abort"),
        Completion(reply_tokens(tok, "good"), "stop"),
        Completion(reply_tokens(tok, call), "stop"),  # a tool call, no text: valid
    ]
    rewards = {"good": 1.0, "": 2.0}

    def scorer(prompt: Sequence[Message], responses: Sequence[Sequence[Message]]) -> list[float]:
        return [rewards[r[0].content] for r in responses]

    result = rejection_sample(
        FakeSampler(completions), scorer, chat, PROMPTS[:2], settings(k=7), progress=False
    )
    report = result.report
    assert dict(report.rejected_samples.dropped) == {
        "empty": 4,
        "truncated": 2,
        "special token": 2,
        "failed": 2,
    }
    assert "<|start_header_id|>" in report.rejected_samples.examples["special token"][0]
    assert report.valid == 4 and report.kept == 2
    kept = result.sft[0].messages[-1]
    assert kept.content == "" and kept.tool_calls[0].name == "get_weather"


def test_below_threshold_prompts_are_dropped(chat: ChatFormat, tokenizer: Tokenizer) -> None:
    """A prompt whose best reward is below min_reward is counted "below threshold", not kept."""
    sampler = FakeSampler([Completion(reply_tokens(tokenizer, "x"), "stop")] * 2)

    def scorer(prompt: Sequence[Message], responses: Sequence[Sequence[Message]]) -> list[float]:
        return [0.5 if "prime" in prompt[-1].content else 0.1] * len(responses)

    result = rejection_sample(
        sampler, scorer, chat, PROMPTS, settings(k=2, min_reward=0.3), progress=False
    )
    assert [row.messages[:-1] for row in result.sft] == [PROMPTS[1].messages]
    assert result.report.dropped_prompts.dropped == {"below threshold": 3}
    assert result.report.mean_kept_reward == result.report.mean_random_reward == 0.5


def test_pairs_are_best_against_worst(chat: ChatFormat, tokenizer: Tokenizer) -> None:
    """pairs=True: chosen is the highest reward, rejected the lowest; one valid sample or equal
    rewards make no pair and are counted."""
    words = ["mid", "top", "low", "top"]
    sampler = FakeSampler([Completion(reply_tokens(tokenizer, w), "stop") for w in words])
    value = {"low": 0.0, "mid": 0.5, "top": 1.0}

    def scorer(prompt: Sequence[Message], responses: Sequence[Sequence[Message]]) -> list[float]:
        return [value[r[0].content] for r in responses]

    result = rejection_sample(
        sampler, scorer, chat, PROMPTS[:1], settings(k=4, pairs=True), progress=False
    )
    (pair,) = result.pairs
    assert pair.prompt == PROMPTS[0].messages
    assert pair.chosen is not None and pair.chosen[0].content == "top"
    assert pair.rejected is not None and pair.rejected[0].content == "low"

    def flat(prompt: Sequence[Message], responses: Sequence[Sequence[Message]]) -> list[float]:
        return [0.0] * len(responses)

    one = FakeSampler([Completion(reply_tokens(tokenizer, "a"), "stop"), Completion([], "length")])
    skipped = rejection_sample(
        one, flat, chat, PROMPTS[:1], settings(k=2, pairs=True), progress=False
    ).report
    assert skipped.skipped_pairs.dropped == {"one valid sample": 1}
    equal = rejection_sample(
        sampler, flat, chat, PROMPTS[:1], settings(k=4, pairs=True), progress=False
    ).report
    assert equal.skipped_pairs.dropped == {"equal rewards": 1} and equal.pairs == 0


def test_a_prompt_too_long_for_the_context_is_dropped(engine: Engine, chat: ChatFormat) -> None:
    """prompt + max_tokens beyond the engine's context: counted "prompt too long", not sampled."""
    result = rejection_sample(
        engine, text_reward, chat, PROMPTS[:2], settings(max_tokens=500), progress=False
    )
    assert result.report.dropped_prompts.dropped == {"prompt too long": 2}
    assert result.report.samples == 0 and result.sft == []
    assert result.report.mean_kept_reward is None


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"k": 0}, "k = 0: must be greater than or equal to 1"),
        ({"temperature": 0.0}, "temperature 0.0 is greedy decoding"),
        ({"k": 1, "pairs": True}, "pairs = true needs k >= 2"),
        ({"top_p": 0.0}, "top_p = 0.0: must be greater than 0"),
        ({"min_reward": float("nan")}, "min_reward = nan"),
        ({"samples": 10}, "samples: unknown key"),
    ],
)
def test_bad_settings_raise_naming_the_field(fields: dict[str, Any], message: str) -> None:
    """Bad settings raise a ValueError that, printed as the CLI prints configs, names the field,
    its value and the rule."""
    with pytest.raises(ValidationError) as error:
        SamplingSettings(**fields)
    assert isinstance(error.value, ValueError)
    assert message in format_validation_error(error.value, SamplingSettings)


def test_greedy_is_allowed_with_one_sample() -> None:
    """k = 1 with temperature 0 is valid (one greedy answer per prompt)."""
    assert SamplingSettings(k=1, temperature=0.0).k == 1


def test_a_scorer_returning_the_wrong_number_of_rewards_raises(
    chat: ChatFormat, tokenizer: Tokenizer
) -> None:
    """A scorer must return one finite reward per response; otherwise a ValueError names it."""
    sampler = FakeSampler([Completion(reply_tokens(tokenizer, "x"), "stop")] * 2)

    def short(prompt: Sequence[Message], responses: Sequence[Sequence[Message]]) -> list[float]:
        return [1.0]

    def nan(prompt: Sequence[Message], responses: Sequence[Sequence[Message]]) -> list[float]:
        return [float("nan")] * len(responses)

    with pytest.raises(ValueError, match="prompt 0: the scorer returned 1 rewards for 2"):
        rejection_sample(sampler, short, chat, PROMPTS, settings(k=2), progress=False)
    with pytest.raises(ValueError, match="non-finite reward nan"):
        rejection_sample(sampler, nan, chat, PROMPTS, settings(k=2), progress=False)


def test_an_engine_that_never_stops_is_refused(model: Llama) -> None:
    """An engine without end-of-sequence ids would only give truncated samples: refused."""
    engine = Engine(model, None, EngineConfig(block_size=16, pack_weights=False))
    with pytest.raises(ValueError, match="no end-of-sequence token ids"):
        EngineSampler(engine)


def test_prompts_may_be_a_stream(chat: ChatFormat, tokenizer: Tokenizer) -> None:
    """Prompts may come from an iterator (a large file read lazily); positions still count."""
    sampler = FakeSampler([Completion(reply_tokens(tokenizer, "x"), "stop")])

    def stream() -> Iterator[PromptRow]:
        yield from PROMPTS

    def scorer(prompt: Sequence[Message], responses: Sequence[Sequence[Message]]) -> list[float]:
        return [1.0] * len(responses)

    result = rejection_sample(
        sampler, scorer, chat, stream(), settings(k=1, prompts_per_batch=3), progress=False
    )
    assert result.report.prompts == result.report.kept == len(PROMPTS)
