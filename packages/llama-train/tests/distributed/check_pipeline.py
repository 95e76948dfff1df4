"""Worker: pipelined loss and gradients equal one process's on the same batch.

Usage: ``check_pipeline.py --pp P CASE [CASE ...]``, each CASE
``SCHEDULE,STAGES_PER_RANK,N_MICROBATCHES,LAYERS,FSDP``: LAYERS is ``even`` or dash-separated
layers per stage (``1-2-2-1``; the model gets that many layers); FSDP is 1 to wrap every block and
every stage module with `fully_shard` over the mesh's ``fsdp`` view (world / P ranks; each
data-parallel rank then runs its own slice of the batch). For each case and two consecutive
steps (the first one also infers the activations' shapes), every rank checks the loss against the
unpipelined full-batch loss and each of its stages' parameter gradients, looked up by name in the
full model's, and the stages' names together are exactly the full model's, each on one stage.
"""

from __future__ import annotations

import argparse

import _common
import torch
import torch.distributed as dist
from torch.distributed.fsdp import fully_shard

from llama_model import Documents
from llama_train.data import IGNORE_INDEX, Batch
from llama_train.parallel import ParallelDims, ParallelMesh, build_mesh
from llama_train.parallel.pipeline import build_pipeline, split_llama

BATCH = 8  # rows in the global batch; each dp rank runs BATCH / dp of them


def dp_slice(batch: Batch, dp_rank: int, dp: int) -> Batch:
    rows = slice(dp_rank * BATCH // dp, (dp_rank + 1) * BATCH // dp)
    return Batch(batch.tokens[rows], batch.targets[rows], batch.document_ids[rows])


def run_case(case: str, mesh: ParallelMesh) -> None:
    schedule, per_rank, n_mb, layers, use_fsdp = case.split(",")
    stages_per_rank, n_microbatches = int(per_rank), int(n_mb)
    layers_per_stage = None if layers == "even" else [int(n) for n in layers.split("-")]
    n_layers = 4 if layers_per_stage is None else sum(layers_per_stage)
    config = _common.tiny_config(n_layers=n_layers)
    model = _common.tiny_model(config)
    pp_mesh, dp_mesh, fsdp_mesh = mesh["pp"], mesh["dp"], mesh["fsdp"]
    dp, dp_rank = dp_mesh.size(), dp_mesh.get_local_rank()

    modules = split_llama(
        model,
        pp_rank=pp_mesh.get_local_rank(),
        pp_size=pp_mesh.size(),
        stages_per_rank=stages_per_rank,
        layers_per_stage=layers_per_stage,
    )
    # Each parameter is on exactly one stage, under its name in the full model.
    names = [name for module in modules for name, _ in module.named_parameters()]
    gathered: list[list[str] | None] = [None] * pp_mesh.size()
    dist.all_gather_object(gathered, names, group=pp_mesh.get_group())
    everywhere = [name for rank_names in gathered for name in rank_names or []]
    full_names = [name for name, _ in model.named_parameters()]
    assert sorted(everywhere) == sorted(full_names), (case, sorted(everywhere))

    if stages_per_rank > 1:  # a rank must get its own stages, in order (checked before any comm)
        try:
            build_pipeline(modules[::-1], schedule=schedule, n_microbatches=n_microbatches,
                           device=torch.device("cpu"), group=pp_mesh.get_group())  # fmt: skip
        except ValueError as error:
            assert "must run stages" in str(error), error
        else:
            raise AssertionError("build_pipeline accepted stages in the wrong order")
    if use_fsdp == "1":
        for module in modules:
            for layer in module.layers.values():
                fully_shard(layer, mesh=fsdp_mesh)
            fully_shard(module, mesh=fsdp_mesh)
    pipeline = build_pipeline(
        modules,
        schedule=schedule,
        n_microbatches=n_microbatches,
        device=torch.device("cpu"),
        group=pp_mesh.get_group(),
    )
    if n_microbatches > 1:  # checked before any communication, so every rank raises
        try:
            odd = _common.tiny_batch(config, batch=n_microbatches + 1)
            pipeline.step(odd.tokens, odd.targets, attention=Documents(odd.document_ids))
        except ValueError as error:
            assert "is not divisible by n_microbatches" in str(error), error
        else:
            raise AssertionError("a batch not divisible into micro-batches was accepted")
    for seed in (2, 3):  # the second step reuses the shapes inferred in the first
        batch = _common.tiny_batch(config, batch=BATCH, seed=seed)
        expected_loss, expected_grads = _common.reference(model, batch)
        # FSDP averages gradients over dp: divide by global targets / dp for the global mean.
        num_targets = int((batch.targets != IGNORE_INDEX).sum()) / dp if dp > 1 else None
        for module in modules:
            module.zero_grad(set_to_none=True)
        local = dp_slice(batch, dp_rank, dp)
        loss = pipeline.step(
            local.tokens,
            local.targets,
            attention=Documents(local.document_ids),
            num_targets=num_targets,
            broadcast_loss=True,
        )
        assert loss is not None
        dist.all_reduce(loss, group=dp_mesh.get_group())
        loss /= dp  # each dp rank's loss is its share of the global mean, times dp
        atol, rtol = _common.LOSS_TOL["atol"], _common.LOSS_TOL["rtol"]
        assert abs(loss.item() - expected_loss) <= atol + rtol * abs(expected_loss), (
            f"{case}, step seed {seed}: loss {loss.item()} != {expected_loss} (single process)"
        )
        for module in modules:
            grads = {n: p.grad for n, p in module.named_parameters() if p.grad is not None}
            own = {n: expected_grads[n] for n, _ in module.named_parameters()}
            try:
                _common.check_grads(grads, own)
            except AssertionError as error:
                stage = "layers " + ",".join(module.layers.keys())  # type: ignore[operator]
                raise AssertionError(f"{case}, stage {stage}, step seed {seed}: {error}") from error
    if dist.get_rank() == 0:
        print(f"ok {case}: loss {expected_loss:.6f}", flush=True)


parser = argparse.ArgumentParser()
parser.add_argument("--pp", type=int, required=True)
parser.add_argument("cases", nargs="+")
options = parser.parse_args()

rank, world = _common.init()
device_mesh = build_mesh(ParallelDims(pp=options.pp), world, "cpu")
for spec in options.cases:
    run_case(spec, device_mesh)
_common.done(rank, "pipeline")
