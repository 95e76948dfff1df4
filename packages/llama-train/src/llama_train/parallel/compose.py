"""Composing the parallelisms on one mesh, in torchtitan's order: pipeline split → tensor (+
sequence) parallel → activation checkpointing → `torch.compile` per block → FSDP2 over the
``dp_shard × cp`` ranks (HSDP when ``dp_replicate > 1``). Context parallelism changes no module:
it is the attention backend the trainer passes with each step's shard
(`llama_train.parallel.context_parallel.ContextParallelAttention`).

The trainer passes a `Llama` built on the meta device: splitting and sharding it costs no memory,
and each rank then materialises only its own parts and shards (`materialise`), so a model far larger
than one device can be set up. Each parameter is drawn from its own generator seeded by the run's
seed and the parameter's name (`llama_model.init_parameters`), so any layout starts from exactly
the single-process weights. FSDP sums gradients (divide factor 1): each rank's loss is already its
share of the global batch's mean.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard

from llama_model import Llama, LlamaConfig, init_parameters
from llama_train.config import TrainConfig
from llama_train.parallel.mesh import ParallelDims, ParallelMesh
from llama_train.parallel.pipeline import Pipeline, build_pipeline, split_llama
from llama_train.parallel.tensor_parallel import apply_tensor_parallel

__all__ = ["materialise", "parallelize"]


def parallelize(
    model: Llama, mesh: ParallelMesh, dims: ParallelDims, config: TrainConfig, device: torch.device
) -> tuple[list[nn.Module], Pipeline | None]:
    """Apply the configured parallelisms to `model` (identical on every rank); returns this rank's
    model parts (one, or its pipeline stages) and the pipeline schedule when pp > 1.

    A `model` on the meta device is materialised on `device` after splitting and sharding, and
    initialised from ``config.seed`` (see `materialise`); a model with real weights is used as is."""
    p = config.parallel
    parts: list[nn.Module]
    if dims.pp > 1:
        parts = list(
            split_llama(
                model,
                pp_rank=mesh["pp"].get_local_rank(),
                pp_size=dims.pp,
                stages_per_rank=p.pp_stages_per_rank,
                layers_per_stage=p.pp_layers_per_stage,
            )
        )
    else:
        parts = [model]
    fsdp_size = dims.dp_replicate * dims.dp_shard * dims.cp
    bf16 = config.dtype == "bfloat16"
    for part in parts:
        if dims.tp > 1:
            apply_tensor_parallel(part, mesh["tp"], sequence_parallel=p.sequence_parallel)  # type: ignore[arg-type]
        layers: nn.Module = part.layers  # type: ignore[assignment]
        for name, block in list(layers.named_children()):
            if config.activation_checkpointing:
                block = checkpoint_wrapper(block)
            if config.compile:
                block.compile()
            layers.register_module(name, block)
        if fsdp_size > 1:
            fsdp_mesh = mesh["fsdp"]
            policy = MixedPrecisionPolicy(
                param_dtype=torch.bfloat16 if bf16 else None, reduce_dtype=torch.float32
            )
            for block in layers.children():
                fully_shard(block, mesh=fsdp_mesh, mp_policy=policy)
            fully_shard(part, mesh=fsdp_mesh, mp_policy=policy)
            # Each rank's loss is already divided by the global target count: sum, not average
            # (plain SUM collectives: gloo has no PREMUL_SUM).
            for module in part.modules():
                if isinstance(module, FSDPModule):
                    module.set_gradient_divide_factor(1.0)
                    module.set_force_sum_reduction_for_comms(True)
    for part in parts:
        if any(param.is_meta for param in part.parameters()):
            materialise(part, model.config, seed=config.seed, device=device)
    pipeline = None
    if dims.pp > 1:
        pipeline = build_pipeline(
            parts,
            schedule=p.pp_schedule,
            n_microbatches=p.pp_microbatches,
            device=device,
            group=mesh["pp"].get_group(),
        )
    return parts, pipeline


@torch.no_grad()
def materialise(part: nn.Module, config: LlamaConfig, *, seed: int, device: torch.device) -> None:
    """Give the meta-device `part` (a `Llama` or pipeline stage, after tensor parallelism and
    `fully_shard`) storage on `device` and its from-scratch initial weights
    (`llama_model.init_parameters`: each rank generates one full parameter at a time and keeps
    its shard, so memory peaks at one full parameter on top of the rank's shards)."""
    part.to_empty(device=device)
    init_parameters(part, config, seed=seed)
