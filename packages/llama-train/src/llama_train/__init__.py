"""llama_train: Llama 3 pretraining (§3.3-3.4 of "The Llama 3 Herd of Models", arXiv 2407.21783).

`Trainer(TrainConfig)` runs the paper's recipe (AdamW, warmup + cosine, the batch ramp, annealing
with Polyak averaging) on one `DeviceMesh` combining FSDP2/HSDP, tensor + sequence parallelism,
pipeline parallelism (1F1B, interleaved 1F1B, GPipe) and context parallelism, from one CPU
process to torchrun on a cluster, with sharded crash-safe checkpoints, exact resume, loss-spike
handling and metrics; `llama-train` is its command line. Also: the schedules of §3.4, the
streaming checkpoint average, the scaling-law fits of §3.2.1, and the chunked per-target
log-probabilities post-training scores with.
"""

# Re-exported, the same function: whether bf16 pays is hardware knowledge, so it lives in
# llama_kernels; callers choose TrainConfig.dtype with it.
from llama_kernels import bf16_is_fast
from llama_train.averaging import CheckpointAverage, average_state_dicts
from llama_train.config import TrainConfig
from llama_train.loss import LinearLogProbs, linear_log_probs
from llama_train.metrics import METRICS_FILE, MetricsLogger
from llama_train.parallel import ParallelDims
from llama_train.scaling_laws import (
    PowerLaw,
    compute_optimal,
    fit_from_runs,
    fit_power_law,
    plot_scaling_law,
)
from llama_train.schedules import (
    BatchRamp,
    BatchStage,
    ContextSchedule,
    ContextStage,
    LrSchedule,
    annealed_lr,
)
from llama_train.trainer import Trainer, TrainResult

__all__ = [
    # the trainer
    "TrainConfig",
    "Trainer",
    "TrainResult",
    "ParallelDims",
    "bf16_is_fast",
    # schedules (§3.4)
    "BatchRamp",
    "BatchStage",
    "ContextSchedule",
    "ContextStage",
    "LrSchedule",
    "annealed_lr",
    # the Polyak average of checkpoints (§3.4.3), and of state dicts (llama-align's §4.1.5 average)
    "CheckpointAverage",
    "average_state_dicts",
    # per-target log-probabilities through the output layer a chunk at a time (llama-align's SFT
    # and DPO score with them)
    "LinearLogProbs",
    "linear_log_probs",
    # per-step metrics (JSONL + TensorBoard + loss PNG), which llama-align's loop logs with too
    "MetricsLogger",
    "METRICS_FILE",
    # scaling laws (§3.2.1)
    "PowerLaw",
    "compute_optimal",
    "fit_from_runs",
    "fit_power_law",
    "plot_scaling_law",
]
