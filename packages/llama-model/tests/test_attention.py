"""The attention seam: every backend against dense float64 attention, segments against separate
rows, the positions each backend gives, and micro-batch splitting for pipeline parallelism.

Tolerance: the backends run in float32 and the reference in float64 with a mask written out by
hand (loops over the definition, not the pattern functions under test). float32 attention over
<= 300 keys with O(1) values is exact to ~1e-6; atol = rtol = 1e-5 leaves room for the kernels'
reduction order while a wrong pattern (a visible key hidden or the reverse) moves outputs by 1e-2.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch.distributed.pipelining.microbatch import split_args_kwargs_into_chunks

from llama_model import (
    CachedAttention,
    Causal,
    Documents,
    ExplicitMask,
    KVCache,
    Llama,
    LlamaConfig,
    Segments,
)
from llama_model.masks import segment_positions

TOL = {"atol": 1e-5, "rtol": 1e-5}
HEADS, KV_HEADS, HEAD_DIM = 4, 2, 16

# On CPU FlexAttention runs its eager reference, which warns that it is unfused: expected here.
flex_on_cpu = pytest.mark.filterwarnings(
    "ignore:.*flex_attention called without torch.compile:UserWarning"
)


def qkv(batch: int, seq_len: int, seed: int = 0) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, HEADS, seq_len, HEAD_DIM, generator=g)
    k = torch.randn(batch, KV_HEADS, seq_len, HEAD_DIM, generator=g)
    v = torch.randn(batch, KV_HEADS, seq_len, HEAD_DIM, generator=g)
    return q, k, v


def reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    visible: Callable[[int, int, int], bool],
) -> torch.Tensor:
    """softmax(q kᵀ/√D + mask) v in float64, the mask filled entry by entry from `visible(b, i, j)`
    (query i, key j); grouped-query heads repeated as Meta's `repeat_kv` does."""
    batch, _, seq_q, _ = q.shape
    seq_k = k.shape[2]
    mask = torch.tensor(
        [[[visible(b, i, j) for j in range(seq_k)] for i in range(seq_q)] for b in range(batch)]
    )[:, None]  # [B, 1, T_q, T_k]
    k, v = (t.double().repeat_interleave(HEADS // KV_HEADS, dim=1) for t in (k, v))
    scores = q.double() @ k.transpose(-1, -2) / HEAD_DIM**0.5
    scores = scores.masked_fill(~mask, float("-inf"))
    return (torch.softmax(scores, dim=-1) @ v).float()


def test_causal_matches_reference() -> None:
    """Causal: query i sees keys 0..i; positions 0..T-1 unless given."""
    q, k, v = qkv(2, 9)
    expected = reference(q, k, v, lambda b, i, j: j <= i)
    torch.testing.assert_close(Causal()(0, q, k, v), expected, **TOL)
    assert torch.equal(Causal().positions(2, 9, q.device), torch.arange(9)[None])
    given = torch.arange(40, 49)[None]
    assert torch.equal(Causal(given).positions(2, 9, q.device), given)


DOCUMENT_IDS = torch.tensor([[0] * 7 + [1] * 200 + [2] * 93, [4] * 300])


@flex_on_cpu
@pytest.mark.parametrize("kernel", ["dense", "flex"])
def test_documents_match_reference(kernel: str) -> None:
    """Documents (dense mask and FlexAttention block mask, documents crossing 128-token blocks):
    query i sees key j iff j <= i in the same document."""
    ids = DOCUMENT_IDS
    q, k, v = qkv(2, 300, seed=1)
    backend = Documents(ids, kernel=kernel)  # type: ignore[arg-type]
    expected = reference(q, k, v, lambda b, i, j: j <= i and bool(ids[b, i] == ids[b, j]))
    torch.testing.assert_close(backend(0, q, k, v), expected, **TOL)
    restart = torch.cat([torch.arange(7), torch.arange(200), torch.arange(93)])
    assert torch.equal(
        backend.positions(2, 300, q.device), torch.stack([restart, torch.arange(300)])
    )


SEGMENT_IDS = torch.tensor(
    [[0, 0, 0, 1, 1, 2, 2, 2, 0, 0, 1, 2, 2], [0, 0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 3, 3]]
)
SEGMENT_DOCUMENTS = torch.tensor([[0] * 8 + [1] * 5, [5] * 13])


def segment_visible(b: int, i: int, j: int) -> bool:
    """The definition, written out: causal, same document, key in the prefix or in i's segment."""
    same_document = SEGMENT_DOCUMENTS[b, i] == SEGMENT_DOCUMENTS[b, j]
    key_segment = int(SEGMENT_IDS[b, j])
    return j <= i and bool(same_document) and key_segment in (0, int(SEGMENT_IDS[b, i]))


@flex_on_cpu
@pytest.mark.parametrize("kernel", ["dense", "flex"])
def test_segments_match_reference(kernel: str) -> None:
    """Segments: a continuation sees its document's prefix and itself, never another
    continuation; two groups packed in one row do not see each other."""
    q, k, v = qkv(2, 13, seed=2)
    backend = Segments(SEGMENT_IDS, document_ids=SEGMENT_DOCUMENTS, kernel=kernel)  # type: ignore[arg-type]
    torch.testing.assert_close(backend(0, q, k, v), reference(q, k, v, segment_visible), **TOL)


def test_segment_positions_count_the_visible_keys() -> None:
    """A token's position is the number of keys it sees, minus one: prefixes count from their
    document's start, each continuation continues after the prefix."""
    expected = torch.tensor(
        [
            [sum(segment_visible(b, i, j) for j in range(13)) - 1 for i in range(13)]
            for b in range(2)
        ]
    )
    assert torch.equal(segment_positions(SEGMENT_IDS, SEGMENT_DOCUMENTS), expected)
    assert expected[0].tolist() == [0, 1, 2, 3, 4, 3, 4, 5, 0, 1, 2, 2, 3]
    backend = Segments(SEGMENT_IDS, document_ids=SEGMENT_DOCUMENTS)
    assert torch.equal(backend.positions(2, 13, SEGMENT_IDS.device), expected)


def test_explicit_mask_matches_reference() -> None:
    """ExplicitMask applies exactly the given mask (a random one, every query sees itself)."""
    g = torch.Generator().manual_seed(3)
    mask = (torch.rand(2, 1, 10, 10, generator=g) < 0.4) | torch.eye(10, dtype=torch.bool)
    q, k, v = qkv(2, 10, seed=3)
    expected = reference(q, k, v, lambda b, i, j: bool(mask[b, 0, i, j]))
    torch.testing.assert_close(ExplicitMask(mask)(0, q, k, v), expected, **TOL)


def test_cached_attention_matches_reference() -> None:
    """CachedAttention writes the new keys and values at each row's positions and attends over
    the cache up to each query's position: rows at different positions, a 3-token chunk."""
    config = LlamaConfig(
        dim=HEADS * HEAD_DIM, n_layers=2, n_heads=HEADS, n_kv_heads=KV_HEADS, vocab_size=32,
        multiple_of=16, max_seq_len=32,
    )  # fmt: skip
    cache = KVCache(config, batch_size=2, max_seq_len=16)
    g = torch.Generator().manual_seed(4)
    cache.keys.normal_(generator=g)  # what earlier steps left (and garbage beyond)
    cache.values.normal_(generator=g)
    positions = torch.tensor([[4, 5, 6], [9, 10, 11]])
    q, k, v = qkv(2, 3, seed=4)
    out = CachedAttention(cache, positions)(1, q, k, v)
    keys, values = cache.keys[1].clone(), cache.values[1].clone()
    for b in range(2):  # the new keys landed at their positions, nothing else moved
        torch.testing.assert_close(keys[b, :, positions[b]], k[b], atol=0, rtol=0)
        torch.testing.assert_close(values[b, :, positions[b]], v[b], atol=0, rtol=0)
    expected = reference(q, keys, values, lambda b, i, j: j <= int(positions[b, i]))
    torch.testing.assert_close(out, expected, **TOL)


def test_segments_equal_running_each_response_after_its_prompt_alone() -> None:
    """A reward-model row (§4.1.2: one prompt and three responses concatenated) gives every
    response the hidden states of running (prompt, response) alone, and the prompt those of the
    prompt alone; two such rows packed as documents too. Plain causal attention would not."""
    config = LlamaConfig(
        dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=256, multiple_of=32, max_seq_len=64
    )
    model = Llama(config).eval()
    model.init_weights(seed=0, std=0.2)
    g = torch.Generator().manual_seed(5)
    prompt, responses = (
        torch.randint(0, 256, (5,), generator=g),
        [torch.randint(0, 256, (n,), generator=g) for n in (4, 6, 3)],
    )
    row = torch.cat([prompt, *responses])[None]  # [1, 18]
    segments = torch.cat([torch.full((n,), s) for s, n in enumerate((5, 4, 6, 3))])[None]
    packed_row = torch.cat([row, row], dim=1)  # two groups, one packed row
    with torch.no_grad():
        together = model.hidden_states(row, attention=Segments(segments))
        packed = model.hidden_states(
            packed_row,
            attention=Segments(
                torch.cat([segments, segments], dim=1),
                document_ids=torch.tensor([[0] * 18 + [1] * 18]),
            ),
        )
        causal = model.hidden_states(row)
        alone_prompt = model.hidden_states(prompt[None])
        torch.testing.assert_close(together[:, :5], alone_prompt, **TOL)
        start = 5
        for response in responses:
            alone = model.hidden_states(torch.cat([prompt, response])[None])[:, 5:]
            end = start + len(response)
            torch.testing.assert_close(together[:, start:end], alone, **TOL)
            torch.testing.assert_close(packed[:, 18 + start : 18 + end], alone, **TOL)
            start = end
    assert not torch.allclose(causal[:, 9:15], together[:, 9:15], **TOL)  # response 2 saw 1


class _TaggedSegments(Segments):
    """A caller's subclass (e.g. llama-align's reward-model rows): split like its base."""


@flex_on_cpu
def test_pipeline_micro_batches_split_the_backend_by_rows() -> None:
    """torch.distributed.pipelining cuts every training backend (and a subclass) into
    micro-batches that attend and position like a backend built on the micro-batch's rows alone;
    [1, ...] tensors broadcast over the rows go to every micro-batch whole. Checked on the
    attention output, so FlexAttention's split block masks (batch offset into the full ids) too."""
    ids = torch.tensor([[0, 0, 1, 1], [2, 2, 2, 2], [0, 1, 1, 1], [3, 3, 4, 4]])
    square = torch.rand(4, 1, 4, 4, generator=torch.Generator().manual_seed(7)) < 0.5
    mask = square | torch.eye(4, dtype=torch.bool)
    rows_positions = torch.arange(4).expand(4, 4) + torch.arange(4)[:, None]
    cases: list[tuple[Any, Callable[[slice], Any]]] = [
        (Documents(ids, kernel="dense"), lambda r: Documents(ids[r], kernel="dense")),
        (Documents(ids, kernel="flex"), lambda r: Documents(ids[r], kernel="flex")),
        (Segments(ids % 2, kernel="dense"), lambda r: Segments(ids[r] % 2, kernel="dense")),
        (Segments(ids % 2, kernel="flex"), lambda r: Segments(ids[r] % 2, kernel="flex")),
        (_TaggedSegments(ids % 2), lambda r: _TaggedSegments(ids[r] % 2)),
        (ExplicitMask(mask), lambda r: ExplicitMask(mask[r])),
        (ExplicitMask(mask[:1]), lambda r: ExplicitMask(mask[:1])),  # broadcast: not split
        (Causal(rows_positions), lambda r: Causal(rows_positions[r])),
        (Causal(torch.arange(4)[None]), lambda r: Causal(torch.arange(4)[None])),
        (Causal(), lambda r: Causal()),
    ]
    q, k, v = qkv(4, 4, seed=8)
    for backend, rows_backend in cases:
        _, kwargs = split_args_kwargs_into_chunks((), {"attention": backend}, 2)
        assert len(kwargs) == 2, type(backend)
        for chunk, rows in zip(kwargs, (slice(0, 2), slice(2, 4)), strict=True):
            part, alone = chunk["attention"], rows_backend(rows)
            assert type(part) is type(backend)
            name = type(backend).__name__
            torch.testing.assert_close(
                part.positions(2, 4, ids.device), alone.positions(2, 4, ids.device), msg=name
            )
            got = part(0, q[rows], k[rows], v[rows])
            torch.testing.assert_close(got, alone(0, q[rows], k[rows], v[rows]), **TOL, msg=name)


def test_backend_errors_name_the_values() -> None:
    """Bad ids, kernels, masks and positions are refused with the offending value."""
    with pytest.raises(ValueError, match="document_ids must be an integer"):
        Documents(torch.zeros(4))
    with pytest.raises(ValueError, match="segment_ids must be >= 0"):
        Segments(torch.tensor([[0, -1]]))
    with pytest.raises(ValueError, match=r"segment_ids .* and document_ids .* same"):
        Segments(torch.tensor([[0, 1]]), document_ids=torch.tensor([[0, 0, 0]]))
    with pytest.raises(ValueError, match=r"segment_ids .* and document_ids .* same"):
        Segments(
            torch.tensor([[0, 0, 1, 2]]),
            document_ids=torch.tensor([[0, 0, 0, 0, 1, 1]]),
            positions=torch.arange(4),
        )
    with pytest.raises(ValueError, match="positions must have the tokens' shape"):
        Documents(torch.zeros(1, 4, dtype=torch.long), positions=torch.arange(3))
