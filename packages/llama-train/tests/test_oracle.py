"""The one training path against the oracle: the `Trainer` (one process, no parallelism) takes the
steps of a plain AdamW loop written with torch alone (`oracle.train_plain`) on the same batches,
and the plain loop itself learns."""

from __future__ import annotations

from pathlib import Path

import _common  # tests/distributed/_common.py, on sys.path via conftest
import pytest
import torch
from oracle import train_plain

from llama_data import TokenShards
from llama_model import Llama, load_checkpoint
from llama_train import TrainConfig, Trainer
from llama_train.data import BatchLoader, DataSource


@pytest.fixture(scope="module")
def shards(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("shards") / "tiny"
    _common.write_tiny_shards(str(path))
    return path


def _oracle_run(config: TrainConfig, steps: int) -> tuple[list[float], dict[str, torch.Tensor]]:
    """The plain loop from the run's initial weights on the run's batches."""
    model = Llama(config.model.llama_config())
    model.init_weights(seed=config.seed)
    sources = [DataSource(s.label, TokenShards(s.path), s.weight) for s in config.data.sources]
    loader = BatchLoader(sources, config.data.batch_ramp(), seed=config.data.seed)
    o = config.optimizer
    losses = train_plain(
        model,
        iter(loader.next_batch, None),
        schedule=config.lr_schedule(),
        steps=steps,
        betas=o.betas,
        eps=o.eps,
        weight_decay=o.weight_decay,
        max_grad_norm=o.max_grad_norm,
    )
    return losses, {name: p.detach() for name, p in model.state_dict().items()}


def test_trainer_takes_the_plain_loops_steps(shards: Path, tmp_path: Path) -> None:
    """Losses at every step (rtol 1e-5) and final weights (atol 2e-6) equal the plain loop's:
    float32, the same operations, only reduction order may differ. Clipping is active (max norm
    0.05), so a trainer that skipped or mis-scaled it would fail."""
    overrides = [*_common.trainer_overrides(str(shards), str(tmp_path), steps=4)]
    config = TrainConfig.load(None, [*overrides, "optimizer.max_grad_norm=0.05"])
    trainer = Trainer(config)
    try:
        result = trainer.fit()
    finally:
        trainer.close()
    expected_losses, expected_weights = _oracle_run(config, steps=4)
    got = [result.losses[step] for step in range(4)]
    torch.testing.assert_close(torch.tensor(got), torch.tensor(expected_losses), rtol=1e-5, atol=0)
    exported = load_checkpoint(tmp_path / "model").state_dict()
    assert exported.keys() == expected_weights.keys()
    for name, tensor in exported.items():
        torch.testing.assert_close(tensor, expected_weights[name], atol=2e-6, rtol=0, msg=name)
    assert got[0] != got[-1]  # the weights moved


def test_the_plain_loop_lowers_the_loss(shards: Path) -> None:
    """The oracle itself trains: 40 steps on the tiny shards lower the loss well below its
    starting value (about log(256) at random initialisation)."""
    config = TrainConfig.load(
        None, [*_common.trainer_overrides(str(shards), "unused"), "optimizer.peak_lr=3e-3"]
    )
    losses, _ = _oracle_run(config.model_copy(update={"steps": 40}), steps=40)
    assert len(losses) == 40
    assert losses[0] > 5.0
    assert sum(losses[-5:]) / 5 < 0.6 * losses[0]
