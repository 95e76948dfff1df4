"""Tests for `llama_train.data.BatchLoader` and `packed_batches` on real token shards.

Most tests use "letter" shards: every document is one ASCII byte repeated 3-10 times, each
document of a source has its own byte, and the sources use disjoint byte ranges. So, independently
of the code under test, a token tells which source and which document it came from, and whether
two neighbouring tokens belong to the same document; the documents' lengths are known from how
they were written. The pseudo-text shards of `tests/distributed/_common.py` (documents of ~100
tokens, longer than a window) cover windows that start in the middle of a document.
"""

from __future__ import annotations

import itertools
import json
import math
import random
from collections.abc import Iterator, Sequence
from pathlib import Path

import _common  # tests/distributed/_common.py, on sys.path via conftest
import numpy as np
import pytest
import torch

from llama_data import Document, TokenShards, write_token_shards
from llama_train.data import IGNORE_INDEX, Batch, BatchLoader, DataSource
from llama_train.schedules import BatchRamp, BatchStage

# byte ranges of the letter sources: one byte per document, disjoint across sources
Letters = dict[str, tuple[TokenShards, dict[int, int]]]  # name → (shards, {byte: length})
LETTERS = {"a": range(33, 65), "b": range(65, 97), "c": range(97, 127)}


def _write_letter_shards(path: Path, letters: Sequence[int], seed: int) -> dict[int, int]:
    """Documents `chr(b) * n` (n in 3..10) for each byte b; returns {byte: document length}."""
    rng = random.Random(seed)
    lengths = {b: rng.randint(3, 10) for b in letters}
    docs = [Document(id=str(b), text=chr(b) * n) for b, n in lengths.items()]
    write_token_shards(
        docs, _common.ByteTokenizer(), path, add_bos=False, add_eos=False, overwrite=True
    )
    return lengths


@pytest.fixture(scope="module")
def letters(tmp_path_factory: pytest.TempPathFactory) -> Letters:
    """name → (shards, {byte: document length}) for the letter sources a, b and c."""
    root = tmp_path_factory.mktemp("letters")
    out: Letters = {}
    for index, (name, byte_range) in enumerate(LETTERS.items()):
        lengths = _write_letter_shards(root / name, byte_range, seed=index)
        out[name] = (TokenShards(root / name), lengths)
    return out


@pytest.fixture(scope="module")
def text_shards(tmp_path_factory: pytest.TempPathFactory) -> TokenShards:
    """Pseudo-text documents of 3-30 words: documents span several windows."""
    path = tmp_path_factory.mktemp("text") / "web"
    _common.write_tiny_shards(str(path), documents=40, seed=5)
    return TokenShards(path)


def _ramp(*stages: tuple[int, int, int]) -> BatchRamp:
    """A ramp from (tokens_seen_threshold, rows, seq_len) triples."""
    return BatchRamp(
        stages=tuple(
            BatchStage(tokens_seen_threshold=t, batch_tokens=rows * seq, seq_len=seq)
            for t, rows, seq in stages
        )
    )


def _sources(letters: Letters, weights: dict[str, float]) -> list[DataSource]:
    return [DataSource(name, letters[name][0], weight) for name, weight in weights.items()]


def _batches(loader: BatchLoader, steps: int) -> Iterator[Batch]:
    return (loader.next_batch() for _ in range(steps))


def _assert_same(actual: Batch, expected: Batch) -> None:
    torch.testing.assert_close(actual.tokens, expected.tokens, rtol=0, atol=0)
    torch.testing.assert_close(actual.targets, expected.targets, rtol=0, atol=0)
    torch.testing.assert_close(actual.document_ids, expected.document_ids, rtol=0, atol=0)


def _source_of_row(row: torch.Tensor) -> str:
    """Which letter source a row came from, from its token values alone."""
    names = {name for name, byte_range in LETTERS.items() for t in row.tolist() if t in byte_range}
    assert len(names) == 1, f"a row mixes sources {names}"
    return names.pop()


# ---------------------------------------------------------------- data parallelism


@pytest.mark.parametrize("dp_size", [2, 4])
def test_dp_ranks_concatenate_to_the_global_batch(
    letters: Letters, text_shards: TokenShards, dp_size: int
) -> None:
    """Ranks 0..dp-1's rows, concatenated, equal the single-rank batch at every step (with a ramp)."""
    ramp = _ramp((0, 8, 16), (600, 16, 24))  # the batch shape changes after step 4

    def sources() -> list[DataSource]:
        return [*_sources(letters, {"a": 1.0, "b": 2.0}), DataSource("web", text_shards, 1.5)]

    reference = BatchLoader(sources(), ramp, seed=11)
    ranks = [
        BatchLoader(sources(), ramp, seed=11, dp_rank=r, dp_size=dp_size) for r in range(dp_size)
    ]
    shapes = set()
    for _ in range(8):
        expected = reference.next_batch()
        parts = [rank.next_batch() for rank in ranks]
        rows = expected.tokens.shape[0]
        assert all(p.tokens.shape == (rows // dp_size, expected.tokens.shape[1]) for p in parts)
        _assert_same(
            Batch(
                tokens=torch.cat([p.tokens for p in parts]),
                targets=torch.cat([p.targets for p in parts]),
                document_ids=torch.cat([p.document_ids for p in parts]),
            ),
            expected,
        )
        shapes.add(tuple(expected.tokens.shape))
        assert all(rank.state_dict() == reference.state_dict() for rank in ranks)
    assert shapes == {(8, 16), (16, 24)}


# ---------------------------------------------------------------- resume


def test_each_rank_reads_only_its_own_windows(
    letters: Letters, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A data-parallel rank passes over the other ranks' windows by their lengths: the windows it
    reads are exactly its rows, and they are the single-rank batch's rows, for 40 steps across
    epoch ends (the letter sources run out several times) and a sequence-length change."""
    from llama_data import WindowStream

    reads = 0
    original = WindowStream.__next__

    def counting(self: WindowStream) -> tuple[object, object]:
        nonlocal reads
        window = original(self)  # StopIteration at an epoch's end is not a read
        reads += 1
        return window

    monkeypatch.setattr(WindowStream, "__next__", counting)
    ramp = _ramp((0, 8, 16), (600, 16, 24))
    reference = BatchLoader(_sources(letters, {"a": 1.0, "b": 2.0}), ramp, seed=3)
    expected = [reference.next_batch() for _ in range(40)]
    assert min(reference.state_dict()["epoch"].values()) > 1  # epochs were crossed
    for rank in range(4):
        reads = 0
        loader = BatchLoader(
            _sources(letters, {"a": 1.0, "b": 2.0}), ramp, seed=3, dp_rank=rank, dp_size=4
        )
        rows = 0
        for whole in expected:
            batch = loader.next_batch()
            n = batch.tokens.shape[0]
            part = slice(rank * n, (rank + 1) * n)
            _assert_same(
                batch,
                Batch(
                    tokens=whole.tokens[part],
                    targets=whole.targets[part],
                    document_ids=whole.document_ids[part],
                ),
            )
            rows += n
        assert reads == rows, rank
        assert loader.state_dict() == reference.state_dict()


@pytest.mark.parametrize(("dp_rank", "dp_size"), [(0, 1), (1, 2)])
def test_resume_at_every_step_continues_exactly(
    letters: Letters, text_shards: TokenShards, dp_rank: int, dp_size: int
) -> None:
    """state_dict → JSON → fresh loader → load_state_dict gives the uninterrupted batches, resumed
    at every step of a run that crosses epoch boundaries and a ramp stage change."""
    ramp = _ramp((0, 4, 16), (900, 6, 32))  # 64 tokens a step, then 192 from step 15 on
    steps = 30

    def make() -> BatchLoader:
        sources = [*_sources(letters, {"a": 1.0, "b": 0.5}), DataSource("web", text_shards, 0.5)]
        return BatchLoader(sources, ramp, seed=3, dp_rank=dp_rank, dp_size=dp_size)

    uninterrupted = make()
    expected, states = [], [uninterrupted.state_dict()]
    for batch in _batches(uninterrupted, steps):
        expected.append(batch)
        states.append(uninterrupted.state_dict())
    # the run must exercise what this test is about
    assert {tuple(b.tokens.shape) for b in expected} == {
        (4 // dp_size, 16),
        (6 // dp_size, 32),
    }
    assert states[-1]["epoch"]["a"] >= 2 and states[-1]["epoch"]["b"] >= 1
    assert any(s["epoch"] != t["epoch"] for s, t in itertools.pairwise(states[1:16]))

    for stop in range(1, steps):
        first = make()
        for _ in range(stop):
            first.next_batch()
        state = json.loads(json.dumps(first.state_dict()))  # plain data, as a checkpoint holds
        assert state == states[stop]
        resumed = make()
        resumed.load_state_dict(state)
        for step in range(stop, steps):
            _assert_same(resumed.next_batch(), expected[step])
        assert resumed.state_dict() == states[-1]


def test_resume_when_a_source_is_exactly_used_up(tmp_path: Path) -> None:
    """A state saved just as a source's last window was taken resumes into the next epoch."""
    # 17 documents of 6 tokens = 102 tokens = 6 windows of 17: two steps of 3 rows use it up
    docs = [Document(id=str(b), text=chr(b) * 6) for b in range(40, 57)]
    write_token_shards(docs, _common.ByteTokenizer(), tmp_path / "s", add_bos=False, add_eos=False)
    shards = TokenShards(tmp_path / "s")
    ramp = _ramp((0, 3, 16))

    uninterrupted = BatchLoader([DataSource("s", shards)], ramp, seed=0)
    expected = list(_batches(uninterrupted, 6))
    first = BatchLoader([DataSource("s", shards)], ramp, seed=0)
    list(_batches(first, 2))
    resumed = BatchLoader([DataSource("s", shards)], ramp, seed=0)
    resumed.load_state_dict(first.state_dict())
    for step in range(2, 6):
        _assert_same(resumed.next_batch(), expected[step])


def test_same_seed_same_batches_other_seed_other_batches(letters: Letters) -> None:
    """Batches are a function of the seed: equal for equal seeds, different otherwise."""
    ramp = _ramp((0, 4, 16))
    one, two, other = (
        BatchLoader(_sources(letters, {"a": 1.0, "b": 1.0}), ramp, seed=seed) for seed in (5, 5, 6)
    )
    a, b, c = (torch.cat([x.tokens for x in _batches(loader, 5)]) for loader in (one, two, other))
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


# ---------------------------------------------------------------- packing and targets


def test_targets_ignored_exactly_where_the_next_token_is_another_document(letters: Letters) -> None:
    """targets[t] is the next token of the same document, or IGNORE_INDEX exactly where the next
    token starts another document; document_ids name the document each input token came from."""
    loader = BatchLoader(
        _sources(letters, {"a": 1.0, "b": 1.0, "c": 1.0}), _ramp((0, 6, 16)), seed=1
    )
    ignored = 0
    for batch in _batches(loader, 20):
        for tokens, targets, ids in zip(
            batch.tokens.tolist(), batch.targets.tolist(), batch.document_ids.tolist(), strict=True
        ):
            shards, lengths = letters[_source_of_row(torch.tensor(tokens))]
            for t, doc in enumerate(ids):  # each token is its document's letter
                assert int(shards.document(doc)[0]) == tokens[t]
            for t in range(len(tokens) - 1):
                expected = tokens[t + 1] if tokens[t + 1] == tokens[t] else IGNORE_INDEX
                assert targets[t] == expected, (t, tokens, targets)
            # last input: its run started inside the row (documents are <= 10 < 16 tokens), so
            # the run length says whether the document ends here
            run = (
                len(tokens)
                - next(t for t in range(len(tokens) - 1, -1, -1) if tokens[t] != tokens[-1])
                - 1
            )
            ends = run == lengths[tokens[-1]]
            assert targets[-1] == (IGNORE_INDEX if ends else tokens[-1]), (tokens, targets)
            ignored += targets.count(IGNORE_INDEX)
    assert ignored > 100  # many document boundaries were checked


def test_a_source_that_runs_out_starts_a_new_epoch_in_a_new_order(letters: Letters) -> None:
    """One window per step: the first num_tokens // 17 windows hold each document at most once;
    then the next epoch starts from a document's first token, in a different order."""
    shards, lengths = letters["a"]
    per_epoch = shards.num_tokens // 17
    loader = BatchLoader([DataSource("a", shards)], _ramp((0, 1, 16)), seed=2)
    rows = [b.tokens[0].tolist() for b in _batches(loader, 2 * per_epoch + 1)]

    def document_order(epoch_rows: list[list[int]]) -> list[int]:
        flat = [t for row in epoch_rows for t in row]
        return [t for i, t in enumerate(flat) if i == 0 or flat[i - 1] != t]

    for epoch in range(2):
        epoch_rows = rows[epoch * per_epoch : (epoch + 1) * per_epoch]
        order = document_order(epoch_rows)
        assert len(order) == len(set(order)), "a document repeated within an epoch"
        assert len(order) >= len(lengths) - 4  # only the dropped tail (< 17 tokens) is missing
        first = epoch_rows[0]
        run = next((i for i, t in enumerate(first) if t != first[0]), len(first))
        assert run == lengths[first[0]], "an epoch must start at a document's first token"
    assert document_order(rows[:per_epoch]) != document_order(rows[per_epoch : 2 * per_epoch])
    assert loader.state_dict()["epoch"]["a"] == 2


def test_mixture_proportions_approach_the_weights(letters: Letters) -> None:
    """Over 400 steps of 16 rows the share of rows from each source is within 5 standard errors
    of its normalised weight, and the per-step counts vary like a multinomial draw.

    With N = 6,400 rows, a share's standard error is sqrt(p(1 - p) / N) <= 0.0063; a correct
    sampler falls outside 5 of them with probability < 1e-6 (for any seed), while unweighted
    sampling (1/3 each) would be off by >= 0.13, i.e. 20 standard errors. The per-step count of a
    source has variance n·p·(1 - p) under a multinomial; its sample variance over 400 steps has a
    relative standard error of about sqrt(2 / 400) = 7%, so 30% is a safe bound that still rejects
    fixed (rounded) counts, whose variance is 0.
    """
    weights = {"a": 1.0, "b": 3.0, "c": 6.0}
    rows, steps = 16, 400
    loader = BatchLoader(_sources(letters, weights), _ramp((0, rows, 16)), seed=4)
    counts = np.zeros((steps, 3))
    names = list(weights)
    for step, batch in enumerate(_batches(loader, steps)):
        for row in batch.tokens:
            counts[step, names.index(_source_of_row(row))] += 1
    total = rows * steps
    for i, name in enumerate(names):
        p = weights[name] / sum(weights.values())
        share = counts[:, i].sum() / total
        assert abs(share - p) < 5 * math.sqrt(p * (1 - p) / total), (name, share, p)
        variance = counts[:, i].var(ddof=1)
        assert variance == pytest.approx(rows * p * (1 - p), rel=0.3), (name, variance)


def test_rows_are_grouped_by_source_in_configured_order(letters: Letters) -> None:
    """Within a global batch the rows come source by source, in the configured order."""
    loader = BatchLoader(
        _sources(letters, {"c": 1.0, "a": 1.0, "b": 1.0}), _ramp((0, 12, 16)), seed=9
    )
    for batch in _batches(loader, 10):
        order = [_source_of_row(row) for row in batch.tokens]
        assert order == sorted(order, key=["c", "a", "b"].index)


# ---------------------------------------------------------------- the batch ramp


@pytest.mark.parametrize(("threshold", "switch_step"), [(192, 3), (200, 4), (193, 4)])
def test_ramp_changes_the_batch_shape_at_the_threshold(
    letters: Letters, threshold: int, switch_step: int
) -> None:
    """4 rows of 16 tokens (64 a step) until tokens seen reach the threshold, then 8 of 32."""
    loader = BatchLoader(
        _sources(letters, {"a": 1.0, "b": 1.0}), _ramp((0, 4, 16), (threshold, 8, 32)), seed=0
    )
    shapes = [tuple(b.tokens.shape) for b in _batches(loader, 7)]
    assert shapes == [(4, 16)] * switch_step + [(8, 32)] * (7 - switch_step)
    assert loader.state_dict()["tokens_seen"] == 64 * switch_step + 256 * (7 - switch_step)


def test_sequence_length_change_restarts_every_stream(
    letters: Letters, text_shards: TokenShards
) -> None:
    """After the sequence length changes, each source's first row starts at a document's first
    token, although the sources were in the middle of an epoch (4,000 tokens, 272 used)."""
    sources = [DataSource("web", text_shards, 1.0), DataSource("a", letters["a"][0], 1.0)]
    loader = BatchLoader(sources, _ramp((0, 4, 16), (256, 8, 32)), seed=0)
    batches = list(_batches(loader, 5))
    assert [tuple(b.tokens.shape) for b in batches] == [(4, 16)] * 4 + [(8, 32)]
    shards = {"web": text_shards, "a": letters["a"][0]}
    seen = set()
    for row, ids in zip(batches[4].tokens.tolist(), batches[4].document_ids.tolist(), strict=True):
        name = "a" if all(t in LETTERS["a"] for t in row) else "web"
        if name in seen:
            continue
        seen.add(name)
        run = next((i for i, d in enumerate(ids) if d != ids[0]), len(ids))
        document = shards[name].document(ids[0]).tolist()
        assert row[:run] == document[:run], f"source {name} did not restart at a document start"
    assert seen == {"web", "a"}


# ---------------------------------------------------------------- errors


def test_no_sources_is_an_error() -> None:
    """A loader needs at least one source."""
    with pytest.raises(ValueError, match="at least one data source"):
        BatchLoader([], _ramp((0, 4, 16)), seed=0)


def test_duplicate_source_names_are_an_error(letters: Letters) -> None:
    """Two sources with one name are rejected, naming them."""
    shards = letters["a"][0]
    with pytest.raises(ValueError, match=r"names must be unique, got \['a', 'a'\]"):
        BatchLoader([DataSource("a", shards), DataSource("a", shards)], _ramp((0, 4, 16)), seed=0)


@pytest.mark.parametrize("weight", [0.0, -1.0, float("nan")])
def test_non_positive_weight_is_an_error(letters: Letters, weight: float) -> None:
    """A weight that is not > 0 is rejected, naming the source."""
    sources = [DataSource("a", letters["a"][0]), DataSource("b", letters["b"][0], weight)]
    with pytest.raises(ValueError, match=r"data source 'b' has weight .*weights must be > 0"):
        BatchLoader(sources, _ramp((0, 4, 16)), seed=0)


@pytest.mark.parametrize(
    ("ramp", "dp_size", "message"),
    [
        (((0, 6, 16),), 4, "stage 0 has 6 sequences per batch, not divisible by the 4"),
        (
            ((0, 4, 16), (100, 6, 16)),
            4,
            "stage 1 has 6 sequences per batch, not divisible by the 4",
        ),
        (((0, 3, 16),), 2, "stage 0 has 3 sequences per batch, not divisible by the 2"),
    ],
)
def test_batch_not_divisible_by_dp_is_an_error(
    letters: Letters, ramp: tuple[tuple[int, int, int], ...], dp_size: int, message: str
) -> None:
    """Every ramp stage's rows must split evenly over the data-parallel ranks."""
    with pytest.raises(ValueError, match=message):
        BatchLoader(_sources(letters, {"a": 1.0}), _ramp(*ramp), seed=0, dp_size=dp_size)


@pytest.mark.parametrize(("dp_rank", "dp_size"), [(2, 2), (-1, 2)])
def test_dp_rank_out_of_range_is_an_error(letters: Letters, dp_rank: int, dp_size: int) -> None:
    """dp_rank must lie in [0, dp_size)."""
    with pytest.raises(ValueError, match="outside"):
        BatchLoader(
            _sources(letters, {"a": 1.0}),
            _ramp((0, 4, 16)),
            seed=0,
            dp_rank=dp_rank,
            dp_size=dp_size,
        )


@pytest.mark.parametrize("names", [("a", "c"), ("b", "a"), ("a",)])
def test_loading_state_of_other_sources_is_an_error(
    letters: Letters, names: tuple[str, ...]
) -> None:
    """A state from a loader over other sources (or the same in another order) is refused."""
    ramp = _ramp((0, 4, 16))
    saved = BatchLoader(_sources(letters, {"a": 1.0, "b": 1.0}), ramp, seed=0)
    saved.next_batch()
    other = BatchLoader(_sources(letters, dict.fromkeys(names, 1.0)), ramp, seed=0)
    with pytest.raises(ValueError, match=r"checkpointed data sources \['a', 'b'\] differ"):
        other.load_state_dict(saved.state_dict())


def test_source_shorter_than_one_window_is_an_error(tmp_path: Path, letters: Letters) -> None:
    """A source with fewer than seq_len + 1 tokens is an error naming it and the length."""
    write_token_shards(
        [Document(id="0", text="tiny!")],
        _common.ByteTokenizer(),
        tmp_path / "tiny",
        add_bos=False,
        add_eos=False,
    )
    sources = [DataSource("a", letters["a"][0]), DataSource("tiny", TokenShards(tmp_path / "tiny"))]
    loader = BatchLoader(sources, _ramp((0, 8, 16)), seed=0)
    with pytest.raises(ValueError, match=r"data source 'tiny' has fewer than 17 tokens"):
        for _ in range(10):  # drawn in some step (each row is 'tiny' with probability 1/2)
            loader.next_batch()
