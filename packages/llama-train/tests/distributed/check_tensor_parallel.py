"""Worker: tensor parallelism, with and without sequence parallelism, matches one process.

Run with 2 or 4 processes; all of them form the tp mesh. For each mode the same tiny model and
packed batch give the single-process loss, gradients (gathered) and, after one AdamW step,
parameters. It also checks that the sharding is real: each rank holds 1/tp of every projection,
and under sequence parallelism the residual stream a block sees is 1/tp of the sequence.
"""

from __future__ import annotations

import _common
import torch
from oracle import language_model_loss
from torch.distributed.tensor import DTensor, Replicate, Shard

from llama_model import Llama, LlamaConfig
from llama_train.data import Batch
from llama_train.parallel import ParallelDims, build_mesh
from llama_train.parallel.tensor_parallel import apply_tensor_parallel

# After one AdamW step a parameter moves by lr · g / (|g| + eps) (bias-corrected), which amplifies
# gradient rounding by up to lr / eps = 100 where |g| is near eps; a wrong step moves it by ~lr.
# So parameters must agree to 1% of the step size.
LR, EPS = 1e-3, 1e-5
PARAM_TOL = {"atol": 0.01 * LR, "rtol": 1e-5}


def adamw(model: Llama) -> torch.optim.Optimizer:
    """The recipe's AdamW settings (llama_train.optimizer), with a step large enough to see."""
    return torch.optim.AdamW(
        model.parameters(), lr=LR, betas=(0.9, 0.95), eps=EPS, weight_decay=0.1
    )


def stepped_reference(
    config: LlamaConfig, batch: Batch
) -> tuple[float, dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Single-process loss, gradients, and parameters after one AdamW step."""
    model = _common.tiny_model(config)
    loss, grads = _common.reference(model, batch)
    for name, param in model.named_parameters():
        param.grad = grads[name].clone()
    adamw(model).step()
    return loss, grads, {name: p.detach().clone() for name, p in model.named_parameters()}


def check_sharding(model: Llama, tp: int, sequence_parallel: bool) -> None:
    """Every projection holds 1/tp of its rows (colwise) or columns (rowwise) on this rank."""
    block = model.layers["0"]
    for linear, dim in (
        (block.attention.wq, 0), (block.attention.wk, 0), (block.attention.wv, 0),
        (block.attention.wo, 1), (block.feed_forward.w1, 0), (block.feed_forward.w3, 0),
        (block.feed_forward.w2, 1), (model.tok_embeddings, 0), (model.output, 0),
    ):  # fmt: skip
        weight = linear.weight
        assert isinstance(weight, DTensor) and weight.placements == (Shard(dim),), weight
        assert weight.to_local().shape[dim] * tp == weight.shape[dim], weight.to_local().shape
    norm = block.attention_norm.weight
    if sequence_parallel:
        assert isinstance(norm, DTensor) and norm.placements == (Replicate(),), norm
    else:
        assert not isinstance(norm, DTensor), "without sequence parallelism the norms stay plain"


rank, world = _common.init()
tp_mesh = build_mesh(ParallelDims(tp=world), world, "cpu")["tp"]
config = _common.tiny_config(n_heads=8, n_kv_heads=4)  # GQA at tp=2 (4 q : 2 kv heads per rank)
batch = _common.tiny_batch(config, batch=4, seq_len=16)
expected_loss, expected_grads, expected_params = stepped_reference(config, batch)


def check_mode(sequence_parallel: bool) -> Llama:
    """Parallelise a fresh model, run one step, compare it with the reference; return the model."""
    mode = f"tp={world} sequence_parallel={sequence_parallel}"
    model = _common.tiny_model(config)
    apply_tensor_parallel(model, tp_mesh, sequence_parallel=sequence_parallel)
    check_sharding(model, world, sequence_parallel)

    residual_lengths: list[int] = []
    model.layers["1"].register_forward_pre_hook(
        lambda _module, args: residual_lengths.append(args[0].shape[1])
    )
    loss = language_model_loss(model, batch)
    seq_len = batch.tokens.shape[1]
    expected_length = seq_len // world if sequence_parallel else seq_len
    assert residual_lengths == [expected_length], (mode, residual_lengths)
    assert not isinstance(loss, DTensor)
    torch.testing.assert_close(loss.item(), expected_loss, **_common.LOSS_TOL, msg=mode)
    loss.backward()  # type: ignore[no-untyped-call]
    _common.check_grads(
        {name: p.grad for name, p in model.named_parameters() if p.grad is not None}, expected_grads
    )

    adamw(model).step()
    for name, param in model.named_parameters():
        torch.testing.assert_close(
            _common.full(param.detach()), expected_params[name], **PARAM_TOL,
            msg=lambda m, n=name: f"{mode} {n} after one AdamW step: {m}",
        )  # fmt: skip
    if sequence_parallel:  # the pre-hook refuses a sequence the tp ranks cannot split evenly
        odd = _common.tiny_batch(config, batch=2, seq_len=4 * world + 1)
        try:
            language_model_loss(model, odd)
        except ValueError as error:
            assert f"the sequence length is {4 * world + 1};" in str(error), error
        else:
            raise AssertionError("an indivisible sequence length was accepted")
    if rank == 0:
        print(f"{mode}: loss {loss.item():.6f} (reference {expected_loss:.6f})")
    return model


check_mode(sequence_parallel=True)
model = check_mode(sequence_parallel=False)

try:  # a second application (e.g. after fully_shard) is refused before touching the model
    apply_tensor_parallel(model, tp_mesh)
except ValueError as error:
    assert "already holds DTensor parameters" in str(error), error
else:
    raise AssertionError("apply_tensor_parallel accepted an already distributed model")

_common.done(rank, f"tensor parallel (tp={world})")
