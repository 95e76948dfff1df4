"""Learning on the verifiable task built from real text (`DocstringTask`: questions about stdlib
functions, the true docstring ranked above eight other functions'), split by function: every
number asserted here is measured on the 147 held-out functions, none of which appears in any
training row in any role.

The path is §4's, through the stage functions a user runs: a tiny random-init Llama (real Llama 3
vocabulary) -> SFT on the training questions -> reward model from the SFT model (one ranked row
per question) -> rejection sampling of the held-out questions, scored by that reward model -> DPO
from the SFT model, its reference.

Measured here (2 CPU cores, bf16 autocast, about 4 minutes for the module; in parentheses longer
runs: SFT 150, RM 300, DPO 150 steps on all 8 negatives at lr 1e-4):
- reward model: held-out pair accuracy 0.52 -> 0.77 (0.85) over 1,176 held-out pairs;
- rejection sampling: mean reward of the kept answers 0.75 vs -1.64 for a random one of the K=8;
- DPO (on 2 of the 8 negatives per training function): held-out preference accuracy 0 -> 0.70
  (0.72) and implicit reward margin 0 -> 0.71 (1.54): at the start policy = reference, so every
  pair ties (a tie counts as wrong, TRL's convention).

The thresholds sit well below those numbers and well above chance (0.5), so another CPU's bf16
rounding does not flip the test, while a reward model or DPO that stopped generalising fails it (a
reward model trained on one chosen/rejected row per negative, instead of one ranked row per
question, reached 0.61). The learning rates are larger than the paper's 1e-5: a 2-layer model from
random weights needs them.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from llama_align.config import DpoConfig, RewardConfig, SampleConfig, SftConfig
from llama_align.data import write_rows
from llama_align.stages import run_dpo, run_rm, run_sample, run_sft
from llama_align.tasks import DocstringTask
from llama_model import Llama, LlamaConfig, Tokenizer, save_checkpoint

pytestmark = pytest.mark.slow

NEGATIVES = 8
"""Other functions' answers ranked below each true answer (train and held out)."""
DPO_NEGATIVES = 2
"""DPO pairs each training function's true answer with 2 others (1,178 pairs; the same functions
and split, drawn by the same seed): 100 steps of 16 pairs see 1,600, and the reference
log-probabilities are precomputed for every pair, so fewer pairs keep the test short."""
QUIET: dict[str, Any] = {"progress": False, "tensorboard": False}


def _results(out: Path) -> dict[str, Any]:
    results: dict[str, Any] = json.loads((out / "stage.json").read_text())["results"]
    return results


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict[str, Any]]:
    """The four stages, once; their `stage.json` results by stage."""
    root = tmp_path_factory.mktemp("learning")
    splits = DocstringTask().build(seed=0, negatives=NEGATIVES)
    files = splits.write(root / "task")
    dpo_rows = DocstringTask().build(seed=0, negatives=DPO_NEGATIVES).preference_train
    dpo_data = write_rows(root / "dpo.jsonl", dpo_rows)
    torch.manual_seed(0)
    model = Llama(
        LlamaConfig(
            dim=128, n_layers=2, n_heads=4, n_kv_heads=2, multiple_of=32, max_seq_len=512,
            rope_scaling=None,
        )
    )  # fmt: skip
    model.init_weights(seed=0)
    save_checkpoint(model, root / "init", tokenizer=Tokenizer.llama3())

    def train(steps: int, batch: int, lr: float, **more: Any) -> dict[str, Any]:
        return {"steps": steps, "batch_size": batch, "micro_batch_size": batch, "lr": lr, **more}

    sft = run_sft(
        SftConfig(
            model=root / "init",
            data=[files["sft"]],
            out=root / "sft",
            max_tokens=256,
            train=train(80, 8, 2e-3, warmup_steps=20, final_lr=1e-4, **QUIET),
        )
    )
    rm = run_rm(
        RewardConfig(
            model=sft / "model",
            data=[files["preferences"]],
            heldout=[files["preferences_heldout"]],
            out=root / "rm",
            train=train(150, 16, 5e-4, warmup_steps=10, **QUIET),
        )
    )
    sample = run_sample(
        SampleConfig(
            model=sft / "model",
            reward_model=rm / "model",
            prompts=[files["prompts_heldout"]],
            out=root / "sample",
            sampling={"k": 8, "temperature": 1.0, "top_p": 1.0, "max_tokens": 64},
        )
    )
    dpo = run_dpo(
        DpoConfig(
            model=sft / "model",
            data=[dpo_data],
            heldout=[files["preferences_heldout"]],
            out=root / "dpo",
            train=train(100, 16, 2e-4, warmup_steps=10, **QUIET),
        )
    )
    results = {
        name: _results(out)
        for name, out in [("sft", sft), ("rm", rm), ("sample", sample), ("dpo", dpo)]
    }
    sampling, dpo_results = results["sample"]["sampling"], results["dpo"]
    print(  # shown with -s, and beside any failure
        f"sft loss {results['sft']['first_loss']:.3f} -> {results['sft']['last_loss']:.3f}; "
        f"rm held-out {results['rm']['heldout_pair_accuracy_before']:.3f} -> "
        f"{results['rm']['heldout_pair_accuracy']:.3f}; sampling kept "
        f"{sampling['mean_kept_reward']:.3f} vs random {sampling['mean_random_reward']:.3f}; "
        f"dpo held-out {dpo_results['heldout_accuracy_before']:.3f} -> "
        f"{dpo_results['heldout_accuracy']:.3f}, margin {dpo_results['heldout_margin_before']:.3f}"
        f" -> {dpo_results['heldout_margin']:.3f}"
    )
    return results


def test_sft_learns_the_answers(run: dict[str, dict[str, Any]]) -> None:
    """SFT's loss falls from the uniform guess (ln 128256 = 11.76) by more than half."""
    sft = run["sft"]
    assert sft["dialogs"] == 589 and sft["first_loss"] > 11.0
    assert sft["last_loss"] < 0.5 * sft["first_loss"]


def test_reward_model_ranks_heldout_answers_well_above_chance(
    run: dict[str, dict[str, Any]],
) -> None:
    """Held-out pair accuracy: chance before training, at least 0.65 after (measured 0.77)."""
    rm = run["rm"]
    assert rm["heldout_examples"] == 147
    assert abs(rm["heldout_pair_accuracy_before"] - 0.5) < 0.1
    assert rm["heldout_pair_accuracy"] >= 0.65


def test_rejection_sampling_keeps_answers_the_reward_model_prefers(
    run: dict[str, dict[str, Any]],
) -> None:
    """The best of K=8 has a higher mean reward than a random one of the 8 (by more than 1)."""
    sampling = run["sample"]["sampling"]
    assert sampling["prompts"] == sampling["kept"] == 147
    assert sampling["samples"] == 147 * 8
    assert sampling["mean_kept_reward"] > sampling["mean_random_reward"] + 1.0


def test_dpo_raises_heldout_preference_accuracy_and_margin(
    run: dict[str, dict[str, Any]],
) -> None:
    """Held-out: every pair ties at the start (policy = reference); after 100 steps at least 0.6
    of the 1,176 pairs prefer the true answer (measured 0.70), and the mean margin is above 0.1
    (measured 0.71)."""
    dpo = run["dpo"]
    assert dpo["pairs"] == 589 * DPO_NEGATIVES and dpo["heldout_pairs"] == 147 * NEGATIVES
    assert dpo["heldout_accuracy_before"] == 0.0 and dpo["heldout_margin_before"] == 0.0
    assert dpo["heldout_accuracy"] >= 0.6
    assert dpo["heldout_margin"] > 0.1
