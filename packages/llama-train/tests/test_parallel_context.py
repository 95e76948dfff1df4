"""Context parallelism (§3.3.2): the load-balanced chunk layout, the shard's mask and positions, the
attention backend, and equality with one process on 2 and 4 gloo processes
(`distributed/check_context_parallel.py`)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from subprocess import CompletedProcess

import pytest
import torch
import torch.distributed as dist
from oracle import language_model_loss
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from llama_model import Llama, LlamaConfig
from llama_train.data import IGNORE_INDEX, Batch
from llama_train.parallel.context_parallel import (
    ContextParallelAttention,
    context_parallel_loss,
    context_parallel_mask,
    load_balanced_index,
    shard_batch,
)

RunDistributed = Callable[..., CompletedProcess[str]]  # the conftest fixture's type


def test_load_balanced_index_pairs_chunk_i_with_its_mirror() -> None:
    """Rank i holds chunk i then chunk 2·cp−1−i (written out by hand)."""
    assert load_balanced_index(8, 2, 0).tolist() == [0, 1, 6, 7]
    assert load_balanced_index(8, 2, 1).tolist() == [2, 3, 4, 5]
    assert load_balanced_index(16, 4, 0).tolist() == [0, 1, 14, 15]
    assert load_balanced_index(16, 4, 1).tolist() == [2, 3, 12, 13]
    assert load_balanced_index(16, 4, 3).tolist() == [6, 7, 8, 9]
    assert load_balanced_index(12, 3, 2).tolist() == [4, 5, 6, 7]


@pytest.mark.parametrize("cp_size", [1, 2, 3, 4, 8])
def test_load_balanced_index_is_a_permutation(cp_size: int) -> None:
    """Over all ranks the indices cover 0..T−1 exactly once, T/cp per rank."""
    seq_len = 2 * cp_size * 3
    parts = [load_balanced_index(seq_len, cp_size, r) for r in range(cp_size)]
    assert all(len(p) == seq_len // cp_size for p in parts)
    assert sorted(torch.cat(parts).tolist()) == list(range(seq_len))


@pytest.mark.parametrize("cp_size", [2, 4, 8])
def test_load_balanced_index_balances_causal_work(cp_size: int) -> None:
    """Every rank has the same number of causal (query, key) pairs (query i sees i + 1 keys)."""
    seq_len = 2 * cp_size * 5
    work = {int((load_balanced_index(seq_len, cp_size, r) + 1).sum()) for r in range(cp_size)}
    assert len(work) == 1
    naive = {int((torch.arange(r * 10, (r + 1) * 10) + 1).sum()) for r in range(cp_size)}
    assert len(naive) == cp_size  # contiguous chunks would not be balanced


def test_load_balanced_index_cp1_takes_any_length() -> None:
    """Without context parallelism the one rank holds the whole (even odd-length) sequence."""
    assert load_balanced_index(7, 1, 0).tolist() == list(range(7))


def test_load_balanced_index_errors_name_the_values() -> None:
    """Bad lengths, sizes and ranks fail with messages naming the values and the fix."""
    with pytest.raises(
        ValueError, match=r"seq_len 20 is not divisible by 2 · cp_size = 8.*multiple of 8"
    ):
        load_balanced_index(20, 4, 0)
    with pytest.raises(ValueError, match=r"cp_rank must be in \[0, 2\) for cp_size 2, got 2"):
        load_balanced_index(8, 2, 2)
    with pytest.raises(ValueError, match="cp_size must be >= 1, got 0"):
        load_balanced_index(8, 0, 0)
    with pytest.raises(ValueError, match="seq_len must be >= 1, got 0"):
        load_balanced_index(0, 2, 0)


def _packed_ids(batch: int, seq_len: int, seed: int) -> torch.Tensor:
    """Random contiguous documents per row: [B, T] ids."""
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(batch, seq_len, generator=g) < 0.25).long().cumsum(1)


@pytest.mark.parametrize("cp_size", [1, 2, 4])
def test_mask_matches_a_direct_construction(cp_size: int) -> None:
    """Local queries × all keys: key j visible iff j <= global i and same document (nested loops)."""
    ids = _packed_ids(3, 16, seed=cp_size)
    for rank in range(cp_size):
        index = load_balanced_index(16, cp_size, rank)
        mask = context_parallel_mask(ids, index)
        assert mask.shape == (3, 1, len(index), 16) and mask.dtype == torch.bool
        expected = torch.zeros(3, 1, len(index), 16, dtype=torch.bool)
        for b in range(3):
            for q, i in enumerate(index.tolist()):
                for j in range(16):
                    expected[b, 0, q, j] = j <= i and bool(ids[b, i] == ids[b, j])
        assert torch.equal(mask, expected)


def test_shard_batch_keeps_document_positions_of_the_full_sequence() -> None:
    """A document crossing a chunk boundary keeps counting; tokens/targets are the held columns."""
    ids = torch.tensor([[0, 0, 0, 1, 1, 1, 1, 1]])  # doc 1 spans chunks 1, 2 and 3 (cp = 2)
    tokens = torch.arange(10, 18)[None]
    targets = torch.tensor([[1, 2, IGNORE_INDEX, 4, 5, 6, 7, 8]])
    batch = Batch(tokens=tokens, targets=targets, document_ids=ids)
    rank0, rank1 = shard_batch(batch, 2, 0), shard_batch(batch, 2, 1)
    assert rank0.tokens.tolist() == [[10, 11, 16, 17]]
    assert rank1.targets.tolist() == [[IGNORE_INDEX, 4, 5, 6]]
    assert rank0.positions.tolist() == [[0, 1, 3, 4]]  # not restarted at the chunk
    assert rank1.positions.tolist() == [[2, 0, 1, 2]]
    assert int(rank0.num_targets) == int(rank1.num_targets) == 7  # the whole batch's count
    assert torch.equal(rank1.attention_mask, context_parallel_mask(ids, rank1.index))


def test_shard_batch_rejects_mismatched_shapes() -> None:
    """Targets of another shape than the tokens are refused with both shapes named."""
    batch = Batch(tokens=torch.zeros(2, 8, dtype=torch.long), targets=torch.zeros(2, 7, dtype=torch.long),
                  document_ids=torch.zeros(2, 8, dtype=torch.long))  # fmt: skip
    with pytest.raises(ValueError, match=r"\(2, 8\), \(2, 7\) and \(2, 8\)"):
        shard_batch(batch, 2, 0)


@pytest.fixture
def single_rank_mesh(tmp_path: Path) -> Iterator[DeviceMesh]:
    """A one-process gloo group and its 1-D "cp" mesh (the degenerate context-parallel group)."""
    store = dist.FileStore(str(tmp_path / "store"), 1)  # type: ignore[attr-defined]
    dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    try:
        yield init_device_mesh("cpu", (1,), mesh_dim_names=("cp",))
    finally:
        dist.destroy_process_group()


def _tiny() -> tuple[Llama, Batch]:
    config = LlamaConfig.model_validate(
        {"dim": 32, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2, "vocab_size": 64,
         "multiple_of": 16, "max_seq_len": 16}
    )  # fmt: skip
    model = Llama(config)
    model.init_weights(seed=0, std=0.1)
    ids = _packed_ids(2, 8, seed=3)
    tokens = torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(4))
    return model, Batch(tokens=tokens, targets=tokens.roll(-1, 1), document_ids=ids)


def test_the_backend_on_one_rank_is_the_plain_model(single_rank_mesh: DeviceMesh) -> None:
    """With cp = 1 the backend's loss is the single-process loss, and the model is left as it
    was: a plain forward afterwards gives the same loss (no hooks installed in the model)."""
    model, batch = _tiny()
    expected = language_model_loss(model, batch)
    shard = shard_batch(batch, 1, 0)
    torch.testing.assert_close(context_parallel_loss(model, shard, single_rank_mesh), expected)
    torch.testing.assert_close(language_model_loss(model, batch), expected, atol=0, rtol=0)


def test_the_backend_attends_to_the_gathered_keys_under_its_mask(
    single_rank_mesh: DeviceMesh,
) -> None:
    """Its attention is softmax(q kᵀ/√d + mask) v over the gathered keys in float64 (one rank:
    the gather is the identity), grouped-query heads repeated; its positions are the shard's."""
    ids = _packed_ids(2, 8, seed=5)
    index = load_balanced_index(8, 1, 0)
    mask = context_parallel_mask(ids, index)
    positions = torch.arange(8).expand(2, 8)
    backend = ContextParallelAttention(single_rank_mesh, positions, mask)
    g = torch.Generator().manual_seed(6)
    q, k, v = (torch.randn(2, heads, 8, 16, generator=g) for heads in (4, 2, 2))
    k64, v64 = (t.double().repeat_interleave(2, dim=1) for t in (k, v))
    scores = (q.double() @ k64.transpose(-1, -2) / 4.0).masked_fill(~mask, float("-inf"))
    expected = (torch.softmax(scores, dim=-1) @ v64).float()
    torch.testing.assert_close(backend(0, q, k, v), expected, atol=1e-5, rtol=1e-5)
    assert torch.equal(backend.positions(2, 8, q.device), positions)
    with pytest.raises(ValueError, match=r"do not match this rank's \[2, 7\] tokens"):
        backend.positions(2, 7, q.device)
    with pytest.raises(ValueError, match="mask must be \\[B, 1, T_local, T\\]"):
        ContextParallelAttention(single_rank_mesh, positions, mask[0])


@pytest.mark.distributed
@pytest.mark.parametrize("nprocs", [2, 4])
def test_context_parallel_matches_one_process(run_distributed: RunDistributed, nprocs: int) -> None:
    """cp = 2 and 4 give the single-process loss and gradients on packed documents across chunks."""
    result = run_distributed("check_context_parallel.py", nprocs)
    assert f"OK context parallel cp={nprocs}" in result.stdout
