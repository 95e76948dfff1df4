"""Pipeline parallelism for Llama: stage modules, virtual stages and schedules (§3.3.2).

The model's layers are cut into consecutive stages; stage ``s`` runs on pipeline rank ``s % pp``, so
with ``stages_per_rank = v > 1`` each rank holds ``v`` non-adjacent "virtual" stages, which the
interleaved 1F1B schedule (Narayanan et al. 2021, arXiv 2104.04473) uses to shrink the pipeline
bubble. The paper trains with interleaved 1F1B, a tunable number of micro-batches, and one layer
fewer on the first and last stage to balance the embedding and the output projection and loss
(§3.3.2); `layers_per_stage` expresses any such split. The schedules themselves are PyTorch's
(`torch.distributed.pipelining`: ``1F1B``, ``Interleaved1F1B``, ``GPipe``); this module builds the
stages they run and the loss they backpropagate.

A stage is the `Llama` itself with the parts it does not hold removed (torchtitan's way): its
`layers` keep only the stage's blocks, keyed by their index in the full model, and the first stage
alone keeps `tok_embeddings`, the last alone `norm` and `output`. Parameter names are therefore
those of the full model (``layers.5.attention.wq.weight`` on the stage that holds layer 5), so
distributed checkpoints move between pipeline layouts unchanged, FSDP2 (`fully_shard`) and tensor
parallelism wrap stages like models, and a stage runs the model's one forward.

The attention backend (`llama_model.Documents` for packed documents, or context parallelism's) is
passed to every stage as a keyword argument; PyTorch cuts it into micro-batches with the tokens
(the backends are pytrees of per-row tensors), so packed documents stay invisible to each other in
every stage (§3.2) exactly as in one process.

Loss: micro-batch ``m`` contributes ``sum(cross-entropy over its non-ignored targets) / N`` with
``N`` the non-ignored targets of the *whole* batch, and the schedule does not rescale gradients, so
the micro-batch gradients sum to the gradient of the full batch's mean loss and the summed
micro-batch losses are that mean loss.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal, cast, get_args

import torch
import torch.distributed as dist
from torch import nn

from llama_model import AttentionBackend, Llama
from llama_train.data import IGNORE_INDEX
from llama_train.loss import summed_cross_entropy

if TYPE_CHECKING:  # imported where used: torch.distributed.pipelining takes 1-2 s to import
    from torch.distributed.pipelining import PipelineStage
    from torch.distributed.pipelining.schedules import (
        PipelineScheduleMulti,
        PipelineScheduleSingle,
    )

__all__ = [
    "SCHEDULES",
    "Pipeline",
    "ScheduleName",
    "build_pipeline",
    "check_layers_per_stage",
    "check_schedule",
    "default_layers_per_stage",
    "pipeline_loss",
    "split_llama",
    "stage_indices",
]

ScheduleName = Literal["1F1B", "Interleaved1F1B", "GPipe"]
SCHEDULES: tuple[ScheduleName, ...] = get_args(ScheduleName)


# ---------------------------------------------------------------------------- layout (pure Python)


def default_layers_per_stage(n_layers: int, num_stages: int) -> list[int]:
    """An even split of `n_layers` over `num_stages`; leftover layers go to the interior stages
    first (the first stage also embeds and the last also projects to the vocabulary and computes
    the loss), then to the first stage. E.g. 10 layers on 4 stages → [2, 3, 3, 2]."""
    if num_stages < 1:
        raise ValueError(f"num_stages must be >= 1, got {num_stages}")
    if n_layers < num_stages:
        raise ValueError(
            f"{n_layers} layers cannot fill {num_stages} pipeline stages; use at most "
            f"{n_layers} stages (pp · stages_per_rank) or pass layers_per_stage explicitly"
        )
    base, leftover = divmod(n_layers, num_stages)
    counts = [base] * num_stages
    order = [*range(1, num_stages - 1), 0, num_stages - 1]  # interior, then first, then last
    for stage in order[:leftover]:
        counts[stage] += 1
    return counts


def check_layers_per_stage(
    layers_per_stage: Sequence[int] | None, n_layers: int, num_stages: int
) -> list[int]:
    """`layers_per_stage` validated against the model and the stage count (or the default split).

    Interior stages need at least one layer; the first and last stage may have none (the paper
    gives them fewer layers to balance the embedding and output projection, §3.3.2).
    """
    if layers_per_stage is None:
        return default_layers_per_stage(n_layers, num_stages)
    counts = list(layers_per_stage)
    if len(counts) != num_stages:
        raise ValueError(
            f"layers_per_stage {counts} has {len(counts)} entries but there are {num_stages} "
            "stages (pp · stages_per_rank); give one layer count per stage"
        )
    if any(not isinstance(c, int) or c < 0 for c in counts):
        raise ValueError(f"layers_per_stage {counts} must hold non-negative integers")
    if sum(counts) != n_layers:
        raise ValueError(
            f"layers_per_stage {counts} sums to {sum(counts)} but the model has "
            f"n_layers={n_layers}; the counts must add up to the number of layers"
        )
    empty_interior = [s for s in range(1, num_stages - 1) if counts[s] == 0]
    if empty_interior:
        raise ValueError(
            f"layers_per_stage {counts} leaves interior stage(s) {empty_interior} without layers; "
            "only the first and last stage may have 0 layers"
        )
    return counts


def stage_indices(pp_rank: int, pp_size: int, stages_per_rank: int = 1) -> list[int]:
    """The stages rank `pp_rank` runs: ``pp_rank, pp_rank + pp_size, ...`` (stage s on rank
    s % pp_size, the "loop" placement PyTorch's interleaved schedules expect)."""
    if pp_size < 1 or stages_per_rank < 1:
        raise ValueError(
            f"pp_size and stages_per_rank must be >= 1, got {pp_size} and {stages_per_rank}"
        )
    if not 0 <= pp_rank < pp_size:
        raise ValueError(f"pp_rank {pp_rank} is outside [0, {pp_size})")
    return [pp_rank + k * pp_size for k in range(stages_per_rank)]


def check_schedule(
    schedule: str, *, n_microbatches: int, pp_size: int, stages_per_rank: int
) -> ScheduleName:
    """`schedule` as a known name, after checking the constraints PyTorch's schedule imposes."""
    if schedule not in SCHEDULES:
        raise ValueError(f"unknown pipeline schedule {schedule!r}; choose one of {list(SCHEDULES)}")
    if n_microbatches < 1:
        raise ValueError(f"n_microbatches must be >= 1, got {n_microbatches}")
    name: ScheduleName = schedule  # narrowed by the membership test above
    if name in ("1F1B", "GPipe") and stages_per_rank != 1:
        raise ValueError(
            f"schedule {name!r} runs one stage per rank, got stages_per_rank={stages_per_rank}; "
            "use 'Interleaved1F1B' for virtual stages"
        )
    if name == "1F1B" and n_microbatches < pp_size:
        raise ValueError(
            f"schedule '1F1B' needs n_microbatches >= the number of stages; got "
            f"n_microbatches={n_microbatches} for {pp_size} stages"
        )
    if name == "Interleaved1F1B":
        rounds = max(1, n_microbatches // pp_size)
        if n_microbatches % rounds:
            raise ValueError(
                f"schedule 'Interleaved1F1B' needs n_microbatches to be a multiple of "
                f"max(1, n_microbatches // pp) = {rounds}; got n_microbatches={n_microbatches} "
                f"with pp={pp_size} (a multiple of pp always works)"
            )
    return name


# ---------------------------------------------------------------------------- stage modules


def pipeline_stage(model: Llama, layer_ids: Sequence[int], *, first: bool, last: bool) -> Llama:
    """`model` with only layers `layer_ids`, plus the embedding if `first` and the final norm and
    output projection if `last`. Built on the meta device and, when `model` has real weights,
    filled with copies of them: a meta-device model splits without memory."""
    with torch.device("meta"):
        stage = Llama(model.config)
    keep = {str(i) for i in layer_ids}
    for key in [k for k in stage.layers if k not in keep]:
        del stage.layers[key]
    if not first:
        stage.tok_embeddings = None
    if not last:
        stage.norm, stage.output = None, None
    if not any(p.is_meta for p in model.parameters()):
        weights = model.state_dict()
        stage.load_state_dict(
            {name: weights[name].detach().clone() for name in stage.state_dict()}, assign=True
        )
    return stage


def split_llama(
    model: Llama,
    *,
    pp_rank: int,
    pp_size: int,
    stages_per_rank: int = 1,
    layers_per_stage: Sequence[int] | None = None,
) -> list[Llama]:
    """This rank's stages (`pipeline_stage`), in stage order (see `stage_indices`).

    There are ``pp_size · stages_per_rank`` stages; `layers_per_stage` (default
    `default_layers_per_stage`) gives each stage's number of consecutive layers. `model` is left
    untouched; build it on the meta device to split a large model without memory, then
    ``to_empty(device=...)`` the stages and load a checkpoint (the names match the full model's).
    """
    num_stages = pp_size * stages_per_rank
    if model.config.tie_word_embeddings and num_stages > 1:
        raise ValueError(
            "tie_word_embeddings=True cannot be pipelined: the tied table would sit on both the "
            "first stage (embedding) and the last (output projection), and its two gradients "
            "would have to be summed across ranks, which is not implemented. Use pp=1 "
            "(one stage) or a model with untied embeddings (all Llama 3 models above 3B)"
        )
    counts = check_layers_per_stage(layers_per_stage, model.config.n_layers, num_stages)
    starts = [sum(counts[:s]) for s in range(num_stages)]
    return [
        pipeline_stage(
            model,
            range(starts[s], starts[s] + counts[s]),
            first=s == 0,
            last=s == num_stages - 1,
        )
        for s in stage_indices(pp_rank, pp_size, stages_per_rank)
    ]


# ---------------------------------------------------------------------------- schedules


def pipeline_loss(
    logits: torch.Tensor, targets: torch.Tensor, *, num_targets: torch.Tensor | float
) -> torch.Tensor:
    """One micro-batch's share of the batch's mean cross-entropy: the sum over its non-ignored
    targets divided by `num_targets`, the non-ignored targets of the whole batch (float32)."""
    return summed_cross_entropy(logits, targets) / num_targets


@dataclass
class Pipeline:
    """A built schedule over this rank's stages; `step(batch)` runs one forward and backward.

    Gradients accumulate into the stage modules' parameters (`.grad`), as after
    ``loss.backward()``; zero them between steps as usual.
    """

    schedule: PipelineScheduleSingle | PipelineScheduleMulti
    stages: tuple[PipelineStage, ...]
    n_microbatches: int
    device: torch.device
    group: dist.ProcessGroup
    has_first_stage: bool
    has_last_stage: bool
    last_stage_rank: int  # global rank of the process that runs the last stage

    def step(
        self,
        tokens: torch.Tensor,
        targets: torch.Tensor,
        *,
        attention: AttentionBackend,
        num_targets: torch.Tensor | float | None = None,
        broadcast_loss: bool = False,
    ) -> torch.Tensor | None:
        """Run one pipelined forward and backward on tokens and targets [B, T] (the same on every
        pipeline rank) with the `attention` backend (`llama_model.Documents` for packed documents,
        `ContextParallelAttention` under context parallelism, where the tokens and targets are this
        rank's [B, T_local] shard), cut into micro-batches along the rows.

        Returns the batch's mean loss (detached, float32 scalar) on the rank running the last
        stage and None elsewhere, or on every pipeline rank with ``broadcast_loss=True`` (one
        extra broadcast). `num_targets` divides the summed cross-entropy; default: this batch's
        non-ignored targets. Under data parallelism pass the global batch's count and have FSDP
        sum gradients (divide factor 1, as `llama_train.parallel.compose.parallelize` sets); with
        FSDP's default averaging pass ``global count / dp`` instead.

        The micro-batch shapes are fixed by the first step (PyTorch infers the activations'
        shapes once); later batches must have the same size and sequence length.
        """
        batch_size = tokens.shape[0]
        if batch_size % self.n_microbatches:
            raise ValueError(
                f"batch size {batch_size} is not divisible by n_microbatches="
                f"{self.n_microbatches}; change the batch size or the number of micro-batches"
            )
        tokens = tokens.to(self.device, non_blocking=True)
        targets = targets.to(self.device, non_blocking=True)
        args = (tokens,) if self.has_first_stage else ()
        loss: torch.Tensor | None = None
        if self.has_last_stage:
            if num_targets is None:
                num_targets = (targets != IGNORE_INDEX).sum().clamp(min=1)  # no host sync
            losses: list[torch.Tensor] = []
            self.schedule.step(
                *args,
                target=targets,
                losses=losses,
                return_outputs=False,
                loss_kwargs={"num_targets": num_targets},
                attention=attention,
            )
            loss = torch.stack(losses).sum().detach()
        else:
            self.schedule.step(*args, return_outputs=False, attention=attention)
        if broadcast_loss:
            if loss is None:
                loss = torch.empty((), dtype=torch.float32, device=self.device)
            dist.broadcast(loss, src=self.last_stage_rank, group=self.group)
        return loss


def build_pipeline(
    stages: Sequence[nn.Module],
    *,
    schedule: str,
    n_microbatches: int,
    device: torch.device,
    group: dist.ProcessGroup | None = None,
) -> Pipeline:
    """The `schedule` ("1F1B", "Interleaved1F1B" or "GPipe") over this rank's stage modules.

    `stages` are this rank's stages from `split_llama`, in stage order, possibly already wrapped by
    `fully_shard` or tensor parallelism (wrap before building: the schedule checks for FSDP
    modules to defer the gradient reduce-scatter to the last micro-batch). `group` is the
    pipeline process group (``mesh["pp"].get_group()``); default: the whole world.
    """
    from torch.distributed.pipelining import (
        PipelineStage,
        Schedule1F1B,
        ScheduleGPipe,
        ScheduleInterleaved1F1B,
    )

    group = group if group is not None else dist.group.WORLD
    assert group is not None  # dist.group.WORLD is set once the process group is initialised
    pp_size, pp_rank = dist.get_world_size(group), dist.get_rank(group)
    if not stages:
        raise ValueError("build_pipeline needs this rank's stage modules; got none")
    modules = [cast(Llama, m) for m in stages]  # `fully_shard` keeps the Llama attributes
    stages_per_rank = len(modules)
    num_stages = pp_size * stages_per_rank
    indices = stage_indices(pp_rank, pp_size, stages_per_rank)
    for index, module in zip(indices, modules, strict=True):
        first, last = module.tok_embeddings is not None, module.norm is not None
        if (first, last) != (index == 0, index == num_stages - 1):
            raise ValueError(
                f"pipeline rank {pp_rank} must run stages {indices} of {num_stages} in order, but "
                f"its stage {index} {'has' if first else 'lacks'} the embedding and "
                f"{'has' if last else 'lacks'} the output; split with split_llama(pp_size=<the "
                "group's size>, stages_per_rank=...) and pass this rank's stages in order"
            )
    name = check_schedule(
        schedule, n_microbatches=n_microbatches, pp_size=pp_size, stages_per_rank=stages_per_rank
    )
    pipeline_stages = tuple(
        PipelineStage(m, index, num_stages, device, group=group)
        for index, m in zip(indices, modules, strict=True)
    )
    # scale_grads=False: `pipeline_loss` already divides by the whole batch's target count.
    built: PipelineScheduleSingle | PipelineScheduleMulti
    if name == "Interleaved1F1B":
        built = ScheduleInterleaved1F1B(
            list(pipeline_stages), n_microbatches, loss_fn=pipeline_loss, scale_grads=False
        )
    else:
        single = Schedule1F1B if name == "1F1B" else ScheduleGPipe
        built = single(pipeline_stages[0], n_microbatches, loss_fn=pipeline_loss, scale_grads=False)
    return Pipeline(
        schedule=built,
        stages=pipeline_stages,
        n_microbatches=n_microbatches,
        device=device,
        group=group,
        has_first_stage=indices[0] == 0,
        has_last_stage=indices[-1] == num_stages - 1,
        last_stage_rank=dist.get_global_rank(group, (num_stages - 1) % pp_size),
    )
