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
from pathlib import Path
from subprocess import CompletedProcess

import _common  # tests/distributed/_common.py, on sys.path via conftest
import pytest
import torch
from safetensors.torch import load_file

RunDistributed = Callable[..., CompletedProcess[str]]  # the conftest fixture's type


@pytest.fixture(scope="module")
def reference(
    tmp_path_factory: pytest.TempPathFactory,
) -> tuple[Path, dict[str, float], dict[str, torch.Tensor]]:
    """Shards, and the single-process run's losses and exported weights."""
    from llama_train.config import TrainConfig
    from llama_train.trainer import Trainer

    common = _common
    root = tmp_path_factory.mktemp("trainer")
    shards = root / "shards"
    common.write_tiny_shards(str(shards))
    trainer = Trainer(
        TrainConfig.load(None, common.trainer_overrides(str(shards), str(root / "single")))
    )
    result = trainer.fit()
    trainer.close()
    losses = {str(k): v for k, v in result.losses.items()}
    return shards, losses, load_file(root / "single" / "model" / "model.safetensors")


def _compare(
    out: Path, name: str, losses: dict[str, float], weights: dict[str, torch.Tensor]
) -> None:
    got = json.loads((out / name / "losses.json").read_text())
    assert got.keys() == losses.keys(), name
    for step in losses:
        assert got[step] == pytest.approx(losses[step], rel=1e-5), f"{name} step {step}"
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


@pytest.mark.distributed
@pytest.mark.parametrize(
    ("nprocs", "layouts"), [(2, LAYOUTS_2), (4, LAYOUTS_4)], ids=["2procs", "4procs"]
)
def test_layouts_equal_single_process(
    run_distributed: RunDistributed,
    reference: tuple[Path, dict[str, float], dict[str, torch.Tensor]],
    tmp_path: Path,
    nprocs: int,
    layouts: dict[str, str],
) -> None:
    shards, losses, weights = reference
    specs = [f"{name}:{spec}" for name, spec in layouts.items()]
    run_distributed("check_trainer.py", nprocs, str(shards), str(tmp_path), *specs, timeout=900)
    for name in layouts:
        _compare(tmp_path, name, losses, weights)
