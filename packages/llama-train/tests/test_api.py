"""The public API of llama_train is pinned: adding or removing a name is a deliberate change."""

from __future__ import annotations

from importlib.resources import files

import llama_train

EXPECTED = [
    "TrainConfig", "Trainer", "TrainResult", "parallelize", "ParallelDims", "ParallelMesh",
    "build_mesh", "TrainCheckpointer", "SpikeDetector", "MetricsLogger", "model_flops_utilization",
    "average_checkpoints", "average_state_dicts", "CheckpointAverage", "BatchLoader", "DataSource", "plot_scaling_law",
    "Batch", "BatchRamp", "BatchStage", "StepMetrics", "packed_batches", "train", "ContextSchedule", "ContextStage", "LrSchedule", "PowerLaw",
    "annealed_lr", "compute_optimal", "fit_from_runs", "fit_power_law", "isoflops_minimum",
    "scaling_law_table", "torch_lr_lambda",
]  # fmt: skip


def test_public_api_is_pinned() -> None:
    """__all__ lists exactly the expected names, and each one is importable."""
    assert sorted(llama_train.__all__) == sorted(EXPECTED)
    for name in EXPECTED:
        assert getattr(llama_train, name) is not None


def test_package_ships_type_information() -> None:
    """The installed package carries py.typed."""
    assert files("llama_train").joinpath("py.typed").is_file()
