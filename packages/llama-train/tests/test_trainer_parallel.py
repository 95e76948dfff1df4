"""The Trainer under every parallel layout equals the single-process Trainer (gloo, CPU).

Each layout trains the same tiny model (4 layers, width 64, 4 query / 2 key-value heads) on the
same packed batches for 3 steps. The losses of every step and the exported weights after the last
update must equal a single-process run: losses to rtol 1e-5 and weights to atol 2e-6 (float32;
the layouts sum the same terms in a different order — sharded matmuls, reduce-scatters,
micro-batches — which moves results by a few ulps per step, while a wrong gradient, mask or
learning rate changes the loss at 1e-3 or more and the weights at 1e-4).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from subprocess import CompletedProcess

import _common  # tests/distributed/_common.py, on sys.path via conftest
import pytest
import torch
from safetensors.torch import load_file

RunDistributed = Callable[..., CompletedProcess[str]]  # the conftest fixture's type


RAMP = (
    "data.ramp=[{tokens_seen_threshold=0, batch_tokens=64, seq_len=16}, "
    "{tokens_seen_threshold=128, batch_tokens=64, seq_len=32}]"
)  # steps 0-1: 4 rows of 16 tokens; step 2: 2 rows of 32 (the pipeline must be rebuilt)


@dataclass(frozen=True)
class Run:
    losses: dict[str, float]
    weights: dict[str, torch.Tensor]
    grad_norms: list[float]


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Run]]:
    """Shards, and single-process runs with a fixed batch ("plain") and a ramp ("ramp")."""
    from llama_train.config import TrainConfig
    from llama_train.trainer import Trainer

    root = tmp_path_factory.mktemp("trainer")
    shards = root / "shards"
    _common.write_tiny_shards(str(shards))
    runs = {}
    for name, extra in (("plain", []), ("ramp", [RAMP])):
        out = root / name
        overrides = [*_common.trainer_overrides(str(shards), str(out)), *extra]
        trainer = Trainer(TrainConfig.load(None, overrides))
        result = trainer.fit()
        trainer.close()
        runs[name] = Run(
            losses={str(k): v for k, v in result.losses.items()},
            weights=load_file(out / "model" / "model.safetensors"),
            grad_norms=[
                json.loads(line)["grad_norm"]
                for line in (out / "metrics.jsonl").read_text().splitlines()
            ],
        )
    return shards, runs


def _compare(out: Path, name: str, run: Run) -> None:
    losses, weights, grad_norms = run.losses, run.weights, run.grad_norms
    got = json.loads((out / name / "losses.json").read_text())
    assert got.keys() == losses.keys(), name
    for step in losses:
        assert got[step] == pytest.approx(losses[step], rel=1e-5), f"{name} step {step}"
    # The logged gradient norm (before clipping) is layout-independent too: it is computed over
    # shards, replicas, partial sums and pipeline stages.
    norms = [
        json.loads(line)["grad_norm"]
        for line in (out / name / "metrics.jsonl").read_text().splitlines()
    ]
    assert norms == pytest.approx(grad_norms, rel=1e-5), f"{name} grad norms"
    exported = load_file(out / name / "model" / "model.safetensors")
    assert exported.keys() == weights.keys()
    for key, value in weights.items():
        torch.testing.assert_close(exported[key], value, atol=2e-6, rtol=1e-5, msg=f"{name} {key}")


LAYOUTS_2 = {
    "fsdp": "parallel.dp_shard=2",
    "tp": "parallel.tp=2",
    "tp_no_sp": "parallel.tp=2;parallel.sequence_parallel=false",
    "cp": "parallel.cp=2",
    "pp_1f1b": "parallel.pp=2;parallel.pp_microbatches=2",
    "pp_gpipe": 'parallel.pp=2;parallel.pp_schedule="GPipe";parallel.pp_layers_per_stage=[1,3]',
}
LAYOUTS_4 = {
    "hsdp": "parallel.dp_replicate=2;parallel.dp_shard=2",
    "fsdp_tp": "parallel.dp_shard=2;parallel.tp=2",
    "fsdp_pp": "parallel.dp_shard=2;parallel.pp=2;parallel.pp_microbatches=2",
    "tp_cp": "parallel.tp=2;parallel.cp=2",
    "pp_tp": "parallel.pp=2;parallel.tp=2;parallel.pp_microbatches=2",
    "pp_cp": "parallel.pp=2;parallel.cp=2;parallel.pp_microbatches=2",
    "pp_interleaved": 'parallel.pp=2;parallel.dp_shard=2;parallel.pp_schedule="Interleaved1F1B";'
    "parallel.pp_stages_per_rank=2;parallel.pp_microbatches=2",
}


LAYOUTS_RAMP = {  # the batch shape changes at step 2
    "pp_ramp": f"parallel.pp=2;parallel.pp_microbatches=2;{RAMP}",
    "fsdp_ramp": f"parallel.dp_shard=2;{RAMP}",
}


@pytest.mark.distributed
@pytest.mark.parametrize(
    ("nprocs", "layouts", "run"),
    [(2, LAYOUTS_2, "plain"), (4, LAYOUTS_4, "plain"), (2, LAYOUTS_RAMP, "ramp")],
    ids=["2procs", "4procs", "2procs-ramp"],
)
def test_layouts_equal_single_process(
    run_distributed: RunDistributed,
    reference: tuple[Path, dict[str, Run]],
    tmp_path: Path,
    nprocs: int,
    layouts: dict[str, str],
    run: str,
) -> None:
    shards, runs = reference
    specs = [f"{name}:{spec}" for name, spec in layouts.items()]
    run_distributed("check_trainer.py", nprocs, str(shards), str(tmp_path), *specs, timeout=900)
    for name in layouts:
        _compare(tmp_path, name, runs[run])
