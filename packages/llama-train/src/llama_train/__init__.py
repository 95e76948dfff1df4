"""llama_train: Llama 3 pretraining (§3.3-3.4 of "The Llama 3 Herd of Models", arXiv 2407.21783).

`Trainer(TrainConfig)` runs the paper's recipe (AdamW, warmup + cosine, the batch ramp, annealing
with Polyak averaging) on one `DeviceMesh` combining FSDP2/HSDP, tensor + sequence parallelism,
pipeline parallelism (1F1B, interleaved 1F1B, GPipe) and context parallelism, from one CPU
process to torchrun on a cluster, with sharded crash-safe checkpoints, exact resume, loss-spike
handling and metrics. Also: the schedules, the scaling-law fits of §3.2.1, packed batches from
`llama_data` token shards, a minimal single-process loop, the `llama-train` CLI and `llama-demo`.
"""

from llama_train.averaging import CheckpointAverage, average_checkpoints, average_state_dicts
from llama_train.checkpoint import TrainCheckpointer
from llama_train.config import TrainConfig
from llama_train.data import Batch, BatchLoader, DataSource, packed_batches
from llama_train.loop import StepMetrics, train
from llama_train.metrics import MetricsLogger, model_flops_utilization
from llama_train.parallel import ParallelDims, ParallelMesh, build_mesh
from llama_train.parallel.compose import parallelize
from llama_train.scaling_laws import (
    PowerLaw,
    compute_optimal,
    fit_from_runs,
    fit_power_law,
    isoflops_minimum,
    plot_scaling_law,
    scaling_law_table,
)
from llama_train.schedules import (
    BatchRamp,
    BatchStage,
    ContextSchedule,
    ContextStage,
    LrSchedule,
    annealed_lr,
    torch_lr_lambda,
)
from llama_train.spikes import SpikeDetector
from llama_train.trainer import Trainer, TrainResult

__all__ = [
    # the trainer
    "TrainConfig",
    "Trainer",
    "TrainResult",
    "parallelize",
    "ParallelDims",
    "ParallelMesh",
    "build_mesh",
    "TrainCheckpointer",
    "SpikeDetector",
    "MetricsLogger",
    "model_flops_utilization",
    "CheckpointAverage",
    "average_checkpoints",
    "average_state_dicts",
    # schedules (§3.4)
    "BatchRamp",
    "BatchStage",
    "ContextSchedule",
    "ContextStage",
    "LrSchedule",
    "annealed_lr",
    "torch_lr_lambda",
    # data and the single-process loop
    "Batch",
    "BatchLoader",
    "DataSource",
    "StepMetrics",
    "packed_batches",
    "train",
    # scaling laws (§3.2.1)
    "PowerLaw",
    "compute_optimal",
    "fit_from_runs",
    "fit_power_law",
    "isoflops_minimum",
    "plot_scaling_law",
    "scaling_law_table",
]
