"""llama_train: Llama 3 pretraining (§3.3-3.4 of "The Llama 3 Herd of Models", arXiv 2407.21783).

In progress. So far: the pretraining recipe's schedules (learning rate warmup and cosine decay,
batch-size ramp keyed on tokens seen, staged context-length increase, annealing), the scaling-law
fits of §3.2.1 (IsoFLOPs minima, the power law N*(C) = A·C^α), packed batches from token shards,
a single-process training loop, and the `llama-demo` job. The distributed trainer comes next.
"""

from llama_train.data import Batch, packed_batches
from llama_train.loop import StepMetrics, train
from llama_train.scaling_laws import (
    PowerLaw,
    compute_optimal,
    fit_from_runs,
    fit_power_law,
    isoflops_minimum,
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

__all__ = [
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
    "StepMetrics",
    "packed_batches",
    "train",
    # scaling laws (§3.2.1)
    "PowerLaw",
    "compute_optimal",
    "fit_from_runs",
    "fit_power_law",
    "isoflops_minimum",
    "scaling_law_table",
]
