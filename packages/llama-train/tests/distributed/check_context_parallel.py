"""Worker: context parallelism over all processes (cp = world, 2 or 4) reproduces one process.

Every rank holds the same packed batch (documents crossing the load-balanced chunk boundaries);
each computes its share of the loss on its chunks with keys and values gathered, the shares and
gradients are summed over the cp group, and the result must equal the single-process loss and
gradients (`_common` tolerances). Then the same under FSDP2 sharded over the cp ranks. Negative
controls show the check is sharp: no gather (local keys only), keys left in rank order, a gather
whose backward drops the other ranks' gradient, and positions computed per shard instead of on the
full sequence must all fail it.
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import _common
import torch
import torch.distributed as dist
from oracle import language_model_loss
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import fully_shard

from llama_model import Llama, document_positions
from llama_train.loss import summed_cross_entropy
from llama_train.parallel import ParallelDims, build_mesh
from llama_train.parallel.context_parallel import (
    ContextParallelAttention,
    ContextParallelShard,
    context_parallel_loss,
    gather_sequence,
    shard_batch,
)

SEQ_LEN = 32
LOSS_ATOL, LOSS_RTOL = _common.LOSS_TOL["atol"], _common.LOSS_TOL["rtol"]

rank, world = _common.init()
mesh = build_mesh(ParallelDims(cp=world), world, "cpu")  # dp_shard = 1: all ranks read one batch
cp_mesh = mesh["cp"]
cp_group = cp_mesh.get_group()
cp_rank = cp_mesh.get_local_rank()
assert cp_rank == rank, (cp_rank, rank)

config = _common.tiny_config()
model = _common.tiny_model(config)
batch = _common.tiny_batch(config, batch=4, seq_len=SEQ_LEN)

# The batch must exercise what context parallelism has to get right: several documents per row,
# and documents that continue across chunk boundaries (so a chunk's positions do not start at 0 and
# its queries need keys held by other ranks).
chunk = SEQ_LEN // (2 * world)
ids = batch.document_ids
assert bool((ids[:, 1:] != ids[:, :-1]).any()), "batch has no document boundary"
boundary = torch.arange(chunk, SEQ_LEN, chunk)
assert bool((ids[:, boundary] == ids[:, boundary - 1]).any()), "no document crosses a chunk"

ref_loss, ref_grads = _common.reference(model, batch)
shard = shard_batch(batch, world, cp_rank)


def cp_step(
    model: torch.nn.Module,
    shard: ContextParallelShard,
    backend: type[ContextParallelAttention] = ContextParallelAttention,
) -> tuple[float, dict[str, torch.Tensor]]:
    """Loss and gradients summed over the cp group (the convention of `context_parallel_loss`);
    `backend` replaces the context-parallel attention (the negative controls)."""
    assert isinstance(model, Llama)
    model.zero_grad(set_to_none=True)
    if backend is ContextParallelAttention:
        loss = context_parallel_loss(model, shard, cp_mesh)
    else:
        attention = backend(cp_mesh, shard.positions, shard.attention_mask)
        logits = model(shard.tokens, attention=attention)
        loss = summed_cross_entropy(logits, shard.targets) / shard.num_targets
    loss.backward()  # type: ignore[no-untyped-call]
    total = loss.detach().clone()
    dist.all_reduce(total, group=cp_group)
    grads = {}
    for name, param in model.named_parameters():
        assert param.grad is not None, name
        grad = param.grad.detach().clone()
        dist.all_reduce(grad, group=cp_group)
        grads[name] = grad
    model.zero_grad(set_to_none=True)
    return total.item(), grads


def check_loss(loss: float) -> None:
    torch.testing.assert_close(
        torch.tensor(loss), torch.tensor(ref_loss), atol=LOSS_ATOL, rtol=LOSS_RTOL
    )


def fails(check: Callable[[], None]) -> bool:
    try:
        check()
    except AssertionError:
        return True
    return False


# 1. Context parallel = one process.
loss, grads = cp_step(model, shard)
check_loss(loss)
_common.check_grads(grads, ref_grads)

# 2. Negative controls (each must break the equality).


class RankOrderGather(ContextParallelAttention):
    """Gathered but not re-ordered: the ranks' shards one after the other."""

    def gather(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out = []
        for x in (k, v):
            parts = [torch.empty_like(x) for _ in range(world)]
            dist.all_gather(parts, x.detach().contiguous(), group=cp_group)
            parts[cp_rank] = x
            out.append(torch.cat(parts, dim=2))
        return out[0], out[1]


class LocalGradGather(ContextParallelAttention):
    """Right forward, but the backward keeps only this rank's queries' gradient."""

    def gather(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out = []
        for x in (k, v):
            gathered = gather_sequence(x.detach(), cp_mesh)
            out.append(gathered.index_copy(2, shard.index, x))
        return out[0], out[1]


class NoGather(ContextParallelAttention):
    """Local queries × local keys only."""

    def __init__(self, cp_mesh: DeviceMesh, positions: torch.Tensor, mask: torch.Tensor) -> None:
        super().__init__(cp_mesh, positions, mask[..., shard.index])

    def gather(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return k, v


bad_loss, _ = cp_step(model, shard, NoGather)
assert fails(lambda: check_loss(bad_loss)), "attending to local keys only gave the right loss"

bad_loss, _ = cp_step(model, shard, RankOrderGather)
assert fails(lambda: check_loss(bad_loss)), "keys in rank order gave the right loss"

loss, bad_grads = cp_step(model, shard, LocalGradGather)
check_loss(loss)  # the forward is right ...
assert fails(lambda: _common.check_grads(bad_grads, ref_grads)), "... so must the backward be"

local_positions = document_positions(batch.document_ids[:, shard.index])
shard_local_pos = ContextParallelShard(**{**shard.__dict__, "positions": local_positions})
bad_loss, _ = cp_step(model, shard_local_pos)
assert fails(lambda: check_loss(bad_loss)), "positions per shard gave the right loss"

# 3. The model itself is unchanged: a plain forward reproduces the reference on the full batch.
torch.testing.assert_close(
    language_model_loss(model, batch).detach(),
    torch.tensor(ref_loss),
    atol=LOSS_ATOL,
    rtol=LOSS_RTOL,
)

# 4. Under FSDP2 sharded over the cp ranks (dp_shard_cp, as the trainer composes them). FSDP2
# averages gradients over its group (set_gradient_divide_factor would use PREMUL_SUM, which gloo
# lacks), while the context-parallel shares must be summed: scale the backward by the cp size.
fsdp_model = copy.deepcopy(model)
fsdp_mesh = mesh["dp_shard_cp"]
for layer in fsdp_model.layers.values():
    fully_shard(layer, mesh=fsdp_mesh)
fully_shard(fsdp_model, mesh=fsdp_mesh)
fsdp_loss = context_parallel_loss(fsdp_model, shard, cp_mesh)
(fsdp_loss * cp_mesh.size()).backward()  # type: ignore[no-untyped-call]
total = fsdp_loss.detach().clone()
dist.all_reduce(total, group=cp_group)
check_loss(total.item())
_common.check_grads(
    {n: p.grad for n, p in fsdp_model.named_parameters() if p.grad is not None}, ref_grads
)


_common.done(rank, f"context parallel cp={world}")
