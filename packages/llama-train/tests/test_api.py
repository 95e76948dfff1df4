"""The public API of llama_train is pinned: adding or removing a name is a deliberate change."""

from __future__ import annotations

from importlib.resources import files

import llama_train

EXPECTED = [
    "TrainConfig", "Trainer", "TrainResult", "ParallelDims", "bf16_is_fast",
    "BatchRamp", "BatchStage", "ContextSchedule", "ContextStage", "LrSchedule", "annealed_lr",
    "CheckpointAverage", "average_state_dicts", "MetricsLogger", "METRICS_FILE",
    "LinearLogProbs", "linear_log_probs",
    "PowerLaw", "compute_optimal", "fit_from_runs", "fit_power_law", "plot_scaling_law",
]  # fmt: skip


def test_public_api_is_pinned() -> None:
    """__all__ lists exactly the expected names, and each one is importable."""
    assert sorted(llama_train.__all__) == sorted(EXPECTED)
    for name in EXPECTED:
        assert getattr(llama_train, name) is not None


def test_package_ships_type_information() -> None:
    """The installed package carries py.typed."""
    assert files("llama_train").joinpath("py.typed").is_file()
