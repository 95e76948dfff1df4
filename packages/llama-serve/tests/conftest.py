"""Shared test setup for llama_serve: where the model runs, and tiny models forced to answer given
prompts with given tokens (a guard model's verdict, a tool call), served from real checkpoints."""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TypeAlias

import pytest
import torch
import torch.nn.functional as F

from llama_model import Llama, LlamaConfig, Tokenizer, save_checkpoint
from llama_serve import Engine, SamplingParams

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

# `server_process` (start `llama-serve serve` on a free loopback port) is imported by the server
# tests of this directory.
sys.path.insert(0, str(Path(__file__).parent))


@pytest.fixture
def device() -> str:
    """CUDA when present (the Triton FP8 kernels on Ada/Hopper), else the CPU (the PyTorch
    references)."""
    return DEVICE


ForcedExample: TypeAlias = tuple[Sequence[int], Sequence[int]]
"""(prompt token ids, the answer's token ids ending with a stop token such as <|eot_id|>)."""

_Examples: TypeAlias = tuple[tuple[tuple[int, ...], tuple[int, ...]], ...]

# A model just big enough to memorise a few answers: Llama 3's vocabulary (so that the real
# tokenizer and chat format apply), two narrow layers. The embedding (tied to the output
# projection) keeps nn.Embedding's N(0, 1) initialisation and is frozen: training then touches
# only the small blocks (a dense 128,256 x 64 gradient and its Adam update would cost ~10x more per
# step), and unit-scale embeddings give the logit margins that greedy decoding needs.
FORCED_CONFIG = LlamaConfig(
    dim=64,
    n_layers=2,
    n_heads=2,  # head_dim 32: the smallest vLLM's CPU attention takes (the vLLM backend's tests)
    n_kv_heads=1,
    multiple_of=32,
    max_seq_len=2048,
    rope_scaling=None,
    tie_word_embeddings=True,
)
FORCED_MIN_MARGIN = 2.0  # logit lead of each forced token over the runner-up, for float noise
FORCED_MAX_STEPS = 1000
FORCED_TRAINING_SECONDS: dict[_Examples, float] = {}
"""Wall time each distinct set of examples took to train (for reports)."""


def _examples_key(examples: Sequence[ForcedExample]) -> _Examples:
    tokenizer = Tokenizer.llama3()
    if not examples:
        raise ValueError("forced_checkpoint needs at least one (prompt, answer) example")
    key = tuple((tuple(map(int, prompt)), tuple(map(int, answer))) for prompt, answer in examples)
    answers: dict[tuple[int, ...], tuple[int, ...]] = {}
    for i, (prompt, answer) in enumerate(key):
        if not prompt or not answer:
            raise ValueError(f"example {i}: the prompt and the answer must both have tokens")
        if answer[-1] not in tokenizer.stop_tokens:
            raise ValueError(
                f"example {i}: the answer must end with a stop token (<|eot_id|> "
                f"{tokenizer.eot_id} or <|eom_id|> {tokenizer.eom_id}) so that generation "
                f"stops there; it ends with {answer[-1]}"
            )
        if len(prompt) + len(answer) > FORCED_CONFIG.max_seq_len:
            raise ValueError(
                f"example {i} has {len(prompt) + len(answer)} tokens; the forced model takes "
                f"at most {FORCED_CONFIG.max_seq_len}"
            )
        if answers.setdefault(prompt, answer) != answer:
            raise ValueError(f"example {i}: the same prompt is forced to two different answers")
    return key


def _train_forced(examples: _Examples, *, seed: int = 0) -> Llama:
    """Train `FORCED_CONFIG` (float32, Adam, loss on the answer tokens only) until greedy
    decoding of every prompt yields its answer with a margin of `FORCED_MIN_MARGIN`."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Llama(FORCED_CONFIG)  # PyTorch's default initialisation, from `seed`
    assert model.tok_embeddings is not None
    model.tok_embeddings.weight.requires_grad_(False)
    trained = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(trained, lr=1e-2)
    rows = [
        # The input is the prompt and the answer but its last token; the logits at positions
        # len(prompt) - 1 ... end predict the answer's tokens.
        (torch.tensor([[*prompt, *answer[:-1]]]), len(prompt), torch.tensor(answer))
        for prompt, answer in examples
    ]
    for _ in range(FORCED_MAX_STEPS):
        loss = torch.zeros(())
        margin = float("inf")
        for tokens, prompt_len, answer_ids in rows:
            hidden = model.hidden_states(tokens)[0, prompt_len - 1 :]  # [len(answer), dim]
            logits = model.logits(hidden)  # [len(answer), vocab_size]
            loss = loss + F.cross_entropy(logits, answer_ids)
            forced = logits.detach().gather(1, answer_ids[:, None])[:, 0]
            others = logits.detach().scatter(1, answer_ids[:, None], float("-inf"))
            margin = min(margin, float((forced - others.max(dim=1).values).min()))
        if margin >= FORCED_MIN_MARGIN:
            return model.eval()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    raise AssertionError(
        f"the forced model did not learn its {len(examples)} answers in {FORCED_MAX_STEPS} "
        f"steps (smallest logit margin {margin:.2f}); use fewer or more distinct prompts"
    )


def _check_forced(path: Path, examples: _Examples) -> None:
    """Greedy generation by the serving engine, from the saved checkpoint, gives every answer."""
    engine = Engine.from_pretrained(path, dtype="float32")
    prompts = [list(prompt) for prompt, _ in examples]
    params = [SamplingParams(temperature=0.0, max_tokens=len(answer) + 1) for _, answer in examples]
    outputs = engine.generate(prompts, params)
    for i, ((_, answer), output) in enumerate(zip(examples, outputs, strict=True)):
        generated = output.outputs[0].token_ids
        assert generated == list(answer), (
            f"forced checkpoint {path}: example {i} generates {generated}, not {list(answer)}"
        )


@pytest.fixture(scope="session")
def forced_checkpoint(
    tmp_path_factory: pytest.TempPathFactory,
) -> Callable[[Sequence[ForcedExample]], Path]:
    """A factory: `forced_checkpoint([(prompt_ids, answer_ids), ...]) -> Path` of a Hugging Face
    checkpoint (Llama 3 tokenizer included) of a tiny model whose greedy answer to each prompt
    is exactly its answer tokens (which end with <|eot_id|> or <|eom_id|>). The factory asserts
    that `Engine.from_pretrained(path, dtype="float32")` reproduces every answer before it
    returns. Checkpoints are cached per distinct list of examples for the whole session; other
    prompts get arbitrary answers."""
    built: dict[_Examples, Path] = {}

    def build(examples: Sequence[ForcedExample]) -> Path:
        key = _examples_key(examples)
        if key not in built:
            # One thread: the tiny model's ops gain nothing from more, and on a busy machine
            # OpenMP threads spin against other processes (training took 10-30 s instead of 4 s
            # on a shared 2-core box).
            threads = torch.get_num_threads()
            torch.set_num_threads(1)
            start = time.perf_counter()
            try:
                model = _train_forced(key)
            finally:
                torch.set_num_threads(threads)
            FORCED_TRAINING_SECONDS[key] = time.perf_counter() - start
            path = tmp_path_factory.mktemp("forced") / "checkpoint"
            save_checkpoint(model, path, tokenizer=Tokenizer.llama3())
            _check_forced(path, key)
            built[key] = path
        return built[key]

    return build
