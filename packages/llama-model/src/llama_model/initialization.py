"""From-scratch initialisation of `Llama` parameters, one generator per parameter.

The paper does not state its initialisation; we use GPT-2's (Radford et al. 2019): normal(0, std)
for embeddings and projections, the residual-branch outputs (wo, w2) scaled by 1/sqrt(2·n_layers),
norm gains 1. Each parameter is drawn from its own generator seeded by the run's seed and the
parameter's name, so any part of the model (a pipeline stage, one rank's shard) initialises alone
to exactly the values the whole model would get.
"""

from __future__ import annotations

import hashlib
import math
import re
from collections.abc import Sequence

import torch
from torch import nn

from llama_model.config import LlamaConfig

__all__ = ["init_parameters", "initial_parameter"]

_PARAMETER_NAME = re.compile(
    r"tok_embeddings\.weight|output\.weight|norm\.weight|layers\.(\d+)\."
    r"(attention\.w[qkvo]|feed_forward\.w[123]|attention_norm|ffn_norm)\.weight"
)


def initial_parameter(
    config: LlamaConfig,
    name: str,
    shape: Sequence[int],
    *,
    seed: int,
    std: float = 0.02,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """The from-scratch initial value of the `Llama` parameter `name` (e.g.
    ``"layers.3.feed_forward.w2.weight"``), full size `shape`.

    The paper does not state its initialisation; we use GPT-2's (Radford et al. 2019): normal(0,
    std) for embeddings and projections, with the residual-branch outputs (wo, w2) scaled by
    1/sqrt(2·n_layers) so the residual stream's variance does not grow with depth; norm gains 1.
    The draw comes from a generator of `device`'s type seeded by `seed` and `name` alone, so it
    does not depend on which other parameters a process holds: that is what lets a sharded or
    pipelined model be initialised in place (on the meta device first, then shard by shard) and
    start from exactly the weights of a single-process run on the same device type (on CUDA, the
    same GPU model: torch's random kernels size their grid by the number of SMs, and the values
    follow the grid).
    """
    match = _PARAMETER_NAME.fullmatch(name)
    if match is None:
        raise ValueError(
            f"{name!r} is not a parameter name of Llama (e.g. 'layers.0.attention.wq.weight')"
        )
    if match.group(1) is not None and int(match.group(1)) >= config.n_layers:
        raise ValueError(f"{name!r}: the config has {config.n_layers} layers")
    value = torch.empty(tuple(shape), dtype=dtype, device=device)
    if name.endswith("norm.weight"):
        return value.fill_(1.0)
    digest = hashlib.blake2b(f"{seed}/{name}".encode(), digest_size=8).digest()
    generator = torch.Generator(device=value.device)
    generator.manual_seed(int.from_bytes(digest, "little") >> 1)  # a non-negative int64
    if name.endswith(("attention.wo.weight", "feed_forward.w2.weight")):
        std = std / math.sqrt(2 * config.n_layers)
    return value.normal_(0.0, std, generator=generator)


# Prefixes that wrappers put into parameter names: activation checkpointing, `torch.compile(module)`.
_WRAPPER_PREFIXES = ("_checkpoint_wrapped_module.", "_orig_mod.")


@torch.no_grad()
def init_parameters(
    module: nn.Module, config: LlamaConfig, *, seed: int, std: float = 0.02
) -> None:
    """Set every parameter of `module` to its `initial_parameter` value.

    `module` is a `Llama` or any module whose parameters carry `Llama`'s names (a pipeline stage),
    possibly wrapped by activation checkpointing or `torch.compile` (their name prefixes are
    ignored). A `DTensor` parameter (tensor parallel, FSDP2) gets its own shard of the full value,
    which every rank generates identically, so no communication is needed and memory peaks at one
    full parameter. Build large models on the meta device, shard them, `to_empty(device=...)`,
    then call this.
    """
    distributed = torch.distributed.is_available()
    if distributed:
        from torch.distributed.tensor import DTensor, distribute_tensor
    for name, param in module.named_parameters():
        if param.device.type == "meta":
            raise RuntimeError(
                "initialising needs real storage: call model.to_empty(device=...) first"
            )
        for prefix in _WRAPPER_PREFIXES:
            name = name.replace(prefix, "")
        sharded = param if distributed and isinstance(param, DTensor) else None
        local = sharded.to_local() if sharded is not None else param
        value = initial_parameter(
            config, name, param.shape, seed=seed, std=std, dtype=param.dtype, device=local.device
        )
        if sharded is not None:  # keep this rank's shard of the full value
            value = distribute_tensor(
                value, sharded.device_mesh, sharded.placements, src_data_rank=None
            ).to_local()
        local.copy_(value)
