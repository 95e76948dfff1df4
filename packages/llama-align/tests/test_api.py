"""The public API of llama_align is pinned: adding or removing a name is a deliberate change."""

from __future__ import annotations

import importlib

import llama_align

EXPECTED = [
    "SftRow",
    "PreferenceRow",
    "RankedResponse",
    "PromptRow",
    "DataReport",
    "DataError",
    "read_rows",
    "write_rows",
    "encode_prompt",
    "encode_response",
    "SftExample",
    "RankedExample",
    "PreferenceExample",
    "encode_sft",
    "encode_ranked",
    "encode_preference",
    "AlignTrainer",
    "TrainSettings",
    "TrainResult",
    "Objective",
    "Policy",
    "PackedRow",
    "pack_dialogs",
    "SftObjective",
    "RewardModel",
    "RewardObjective",
    "RewardScorer",
    "pair_accuracy",
    "save_reward_model",
    "load_reward_model",
    "SamplingSettings",
    "Scorer",
    "Sampler",
    "EngineSampler",
    "VllmSampler",
    "SamplingReport",
    "SamplingResult",
    "rejection_sample",
    "DpoObjective",
    "PreferenceWithReference",
    "reference_logprobs",
    "with_reference",
    "preference_accuracy",
    "LoraSettings",
    "add_lora",
    "merge_lora",
    "average_hf_checkpoints",
    "SftSettings",
    "RewardSettings",
    "DpoSettings",
    "SftConfig",
    "RewardConfig",
    "DpoConfig",
    "SampleConfig",
    "AverageConfig",
    "RoundConfig",
    "run_sft",
    "run_rm",
    "run_sample",
    "run_dpo",
    "run_average",
    "run_round",
    "stage_done",
    "DocstringTask",
    "TaskSplits",
]


def test_all_is_pinned() -> None:
    """`llama_align.__all__` lists exactly the expected names, each importable."""
    assert sorted(llama_align.__all__) == sorted(EXPECTED)
    assert len(set(llama_align.__all__)) == len(llama_align.__all__)
    for name in EXPECTED:
        assert hasattr(llama_align, name), name


def test_importing_llama_align_does_not_import_trl() -> None:
    """TRL is an optional extra: the package imports without it (the collator module needs it)."""
    import subprocess
    import sys

    code = "import sys, llama_align; print('trl' in sys.modules)"
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    )
    assert result.stdout.strip() == "False"
    assert importlib.util.find_spec("llama_align.trl_collator") is not None
