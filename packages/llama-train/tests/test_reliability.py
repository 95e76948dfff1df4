"""Reliability of `Trainer` (capability 5): kill-and-resume, killed saves, async saves, pruning
and Polyak averaging, loss-spike skips and rollbacks.

Oracles are independent of the code under test: an uninterrupted run of the same config (on CPU
in float32 a resumed run must reproduce its losses and weights *exactly*, ==, not approximately:
the same operations on the same bytes give the same bytes), the checkpoints' raw DCP contents read
with `dcp_to_torch_save`, a float64 mean computed here, and the loss of the checkpoint's weights on
the next batch recomputed with `language_model_loss`. Kills are real SIGKILLs of a subprocess
(`tests/distributed/crash_train.py` kills itself at a chosen step or half-way through a save); the
kill steps are drawn from a seeded RNG, so the test is random over steps yet reproducible.
"""

from __future__ import annotations

import json
import math
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import _common  # tests/distributed/_common.py, on sys.path via conftest
import pytest
import torch
from oracle import language_model_loss
from safetensors.torch import load_file
from torch.distributed.checkpoint.filesystem import FileSystemWriter
from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

from llama_model import Llama, load_checkpoint
from llama_model.checkpoint import from_hf_name
from llama_train.checkpoint import TrainCheckpointer
from llama_train.config import TrainConfig
from llama_train.data import Batch
from llama_train.trainer import Trainer, TrainResult

WORKERS = Path(__file__).parent / "distributed"
CRASH = WORKERS / "crash_train.py"
STEPS = 10
INTERVAL = 3  # saves after steps 3, 6, 9 and at the end (10)
KILL_STEPS = sorted(random.Random(20261122).sample(range(1, STEPS), 2))
SPIKE = 1.0e4  # an injected loss far above any threshold (the tiny model's loss is ~5)


def _overrides(shards: Path, out: Path, *extra: str, steps: int = STEPS) -> list[str]:
    return [
        *_common.trainer_overrides(str(shards), str(out), steps=steps),
        f"checkpoint.interval={INTERVAL}",
        'device="cpu"',
        *extra,
    ]


@pytest.fixture(scope="module")
def shards(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("reliability") / "shards"
    _common.write_tiny_shards(str(path))
    return path


# --------------------------------------------------------------------------------- subprocesses
def _launch(
    args: list[str], *, nprocs: int = 1, crash: bool = False, killed: bool = False
) -> subprocess.CompletedProcess[str]:
    """Run `llama-train` (or the crash worker when `crash`) on CPU; check it finished or was
    SIGKILLed as expected."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    env.pop("CUDA_VISIBLE_DEVICES", None)
    target = [str(CRASH)] if crash else ["-m", "llama_train.cli"]
    if nprocs > 1:
        command = [
            sys.executable, "-m", "torch.distributed.run", "--standalone",
            f"--nproc-per-node={nprocs}", *target, *args,
        ]  # fmt: skip
    else:
        command = [sys.executable, *target, *args]
    result = subprocess.run(
        command, env=env, capture_output=True, text=True, timeout=300, check=False
    )
    output = f"--- stdout ---\n{result.stdout[-4000:]}\n--- stderr ---\n{result.stderr[-6000:]}"
    if killed:  # torchrun exits 1 and reports the worker's signal
        died = result.returncode == -signal.SIGKILL if nprocs == 1 else "SIGKILL" in result.stderr
        assert died, f"the run was not SIGKILLed (exit {result.returncode})\n{output}"
    else:
        assert result.returncode == 0, f"exit {result.returncode}\n{output}"
    return result


def _losses(out: Path) -> list[tuple[int, float]]:
    """(step, loss) of every record in `out/metrics.jsonl`, in file order."""
    lines = (out / "metrics.jsonl").read_text().splitlines()
    return [(record["step"], record["loss"]) for record in map(json.loads, lines)]


def _weights(out: Path) -> dict[str, torch.Tensor]:
    return load_file(out / "model" / "model.safetensors")


def _assert_bit_identical(got: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    assert got.keys() == expected.keys()
    for key, value in expected.items():
        assert torch.equal(got[key], value), f"{key} differs from the uninterrupted run"


def _leftovers(out: Path) -> list[Path]:
    return sorted((out / "checkpoints").rglob(".tmp-*"))


def _resumed_from(stderr: str) -> int | None:
    match = re.search(r"resumed from \S*step-(\d{8}) at step (\d+)", stderr)
    return None if match is None else int(match.group(2))


Reference = tuple[list[tuple[int, float]], dict[str, torch.Tensor]]


@pytest.fixture(scope="module")
def reference(shards: Path, tmp_path_factory: pytest.TempPathFactory) -> Reference:
    """Losses and exported weights of the uninterrupted single-process run (via the CLI)."""
    out = tmp_path_factory.mktemp("reference")
    _launch(_overrides(shards, out))
    losses = _losses(out)
    assert [step for step, _ in losses] == list(range(STEPS))
    return losses, _weights(out)


@pytest.mark.slow  # SIGKILLed subprocesses: several CLI starts
def test_sigkill_at_random_steps_resumes_exactly(
    shards: Path, reference: Reference, tmp_path: Path
) -> None:
    """A run SIGKILLed mid-step at a random step, restarted, SIGKILLed at a later random step,
    then once more just before its export, and restarted again, logs the uninterrupted run's
    losses exactly and exports bit-identical weights."""
    losses, weights = reference
    args = _overrides(shards, tmp_path)
    resumed_at: int | None = None
    for kill_step in KILL_STEPS:  # e.g. [4, 9]
        killed = _launch(["--kill", f"step:{kill_step}", *args], crash=True, killed=True)
        assert _resumed_from(killed.stderr) == resumed_at
        assert _losses(tmp_path) == losses[:kill_step]  # it died in step kill_step
        assert not (tmp_path / "model").exists()
        resumed_at = kill_step // INTERVAL * INTERVAL or None  # the last save before the kill
    # Killed once more after the final checkpoint, before the export.
    killed = _launch(["--kill", "export:1", *args], crash=True, killed=True)
    assert _resumed_from(killed.stderr) == resumed_at
    assert _losses(tmp_path) == losses

    restarted = _launch(args)
    assert _resumed_from(restarted.stderr) == STEPS
    assert _losses(tmp_path) == losses
    _assert_bit_identical(_weights(tmp_path), weights)
    assert _leftovers(tmp_path) == []


@pytest.mark.slow  # SIGKILLed subprocesses: several CLI starts
def test_save_killed_half_way_keeps_previous_checkpoint(
    shards: Path, reference: Reference, tmp_path: Path
) -> None:
    """A save SIGKILLed half-way (tensor files written but no DCP metadata; then, after a
    restart, complete but not yet renamed) leaves the previous checkpoint loadable; the restart
    resumes from it, removes the partial directory and reproduces the uninterrupted run exactly."""
    losses, weights = reference
    args = _overrides(shards, tmp_path)
    root = tmp_path / "checkpoints"
    partial = root / ".tmp-step-00000006"
    # 1st run: dies inside its 2nd save (step 6), before DCP wrote .metadata.
    _launch(["--kill", "write:2", *args], crash=True, killed=True)
    assert sorted(p.name for p in root.iterdir()) == [partial.name, "step-00000003"]
    assert any(partial.glob("*.distcp")), "the kill came before any tensor was written"
    assert not (partial / ".metadata").exists()
    previous = _read_checkpoint(root / "step-00000003", tmp_path / "step3.pt")
    assert previous["model"].keys() == _our_names(weights)
    assert json.loads((root / "step-00000003" / "train_state.json").read_text())["step"] == 3
    # 2nd run: resumes from step 3, dies after its 1st save (step 6) was written, before the rename.
    second = _launch(["--kill", "publish:1", *args], crash=True, killed=True)
    assert _resumed_from(second.stderr) == 3
    assert sorted(p.name for p in root.iterdir()) == [partial.name, "step-00000003"]
    assert (partial / ".metadata").exists()
    # What every start does first: drop the partial save, find the previous checkpoint.
    assert TrainCheckpointer(root).latest() == root / "step-00000003"
    assert not partial.exists()

    restarted = _launch(args)
    assert _resumed_from(restarted.stderr) == 3
    assert _leftovers(tmp_path) == []
    assert _losses(tmp_path) == losses
    _assert_bit_identical(_weights(tmp_path), weights)


@pytest.mark.slow  # SIGKILLed subprocesses: several CLI starts
def test_resave_killed_between_renames_keeps_the_checkpoint(shards: Path, tmp_path: Path) -> None:
    """A re-save of an existing step (a run restarted after its final save) killed between its
    two renames still leaves that step's checkpoint loadable (keep_last=1: no older one)."""
    args = _overrides(shards, tmp_path, "checkpoint.keep_last=1", "export=false")
    _fit(args)
    root = tmp_path / "checkpoints"
    assert [p.name for p in root.iterdir()] == ["step-00000010"]
    killed = _launch(["--kill", "swap:1", *args], crash=True, killed=True)
    assert _resumed_from(killed.stderr) == STEPS
    assert TrainCheckpointer(root, keep_last=1).latest() == root / "step-00000010"


def test_fresh_run_in_a_used_out_dir_exports_its_own_model(shards: Path, tmp_path: Path) -> None:
    """checkpoint.resume=false in an out_dir left by a longer run trains from scratch *and*
    exports its own model (the same as the same run in an empty directory)."""
    _fit(_overrides(shards, tmp_path / "run", "export=false"))  # leaves step-9 and step-10
    fresh = ("checkpoint.resume=false", "seed=1")
    _fit(_overrides(shards, tmp_path / "run", *fresh, steps=6))
    _fit(_overrides(shards, tmp_path / "alone", *fresh, steps=6))
    _assert_bit_identical(_weights(tmp_path / "run"), _weights(tmp_path / "alone"))


def _our_names(weights: dict[str, torch.Tensor]) -> set[str]:
    """Our parameter names of exported (Hugging Face named) weights."""
    return {from_hf_name(name) for name in weights}


@pytest.mark.slow
@pytest.mark.distributed
def test_sigkill_two_process_fsdp_resumes_exactly(shards: Path, tmp_path: Path) -> None:
    """Under torchrun with FSDP over 2 ranks, SIGKILLing one rank mid-step and restarting
    reproduces the uninterrupted 2-process run's losses and weights exactly."""
    kill_step = random.Random(6).randrange(INTERVAL + 1, STEPS)  # after at least one save
    ref_out, out = tmp_path / "ref", tmp_path / "run"
    _launch(_overrides(shards, ref_out, "parallel.dp_shard=2"), nprocs=2)
    args = _overrides(shards, out, "parallel.dp_shard=2")
    _launch(
        ["--kill", f"step:{kill_step}", "--kill-rank", "1", *args],
        nprocs=2,
        crash=True,
        killed=True,
    )
    assert len(_losses(out)) <= kill_step
    assert not (out / "model").exists()
    restarted = _launch(args, nprocs=2)
    assert _resumed_from(restarted.stderr) == kill_step // INTERVAL * INTERVAL
    assert _losses(out) == _losses(ref_out)
    _assert_bit_identical(_weights(out), _weights(ref_out))


# --------------------------------------------------------------------------------- in process
def _fit(overrides: list[str]) -> TrainResult:
    trainer = Trainer(TrainConfig.load(None, overrides))
    try:
        return trainer.fit()
    finally:
        trainer.close()


def _read_checkpoint(path: Path, scratch: Path) -> dict[str, Any]:
    """A DCP checkpoint's raw contents ({"model": {...}, "optim": {...}}), read by DCP itself."""
    dcp_to_torch_save(path, scratch)
    state: dict[str, Any] = torch.load(scratch, weights_only=True)
    scratch.unlink()
    return state


def _flat(tree: Any, prefix: str = "") -> Iterator[tuple[str, Any]]:
    if isinstance(tree, dict):
        for key, value in tree.items():
            yield from _flat(value, f"{prefix}{key}.")
    else:
        yield prefix.rstrip("."), tree


def _assert_same_checkpoint(a: dict[str, Any], b: dict[str, Any], where: str) -> None:
    flat_a, flat_b = dict(_flat(a)), dict(_flat(b))
    assert flat_a.keys() == flat_b.keys(), where
    for key, value in flat_a.items():
        if isinstance(value, torch.Tensor):
            assert torch.equal(value, flat_b[key]), f"{where}: {key}"
        else:
            assert value == flat_b[key], f"{where}: {key}"


def test_async_save_writes_the_state_of_the_save_step(
    shards: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With async_save the background write overlaps the next optimizer steps, yet every
    checkpoint holds exactly the sync-save run's state at its step, and resuming from one
    continues with the same losses."""
    extra = ("checkpoint.keep_last=10",)
    sync = _fit(_overrides(shards, tmp_path / "sync", *extra))

    # Hold each background write until the next optimizer step has changed the live weights.
    started = [-1]  # the step whose forward/backward began last
    overlapped: list[int] = []
    condition = threading.Condition()
    forward_backward, write_data = Trainer.forward_backward, FileSystemWriter.write_data

    def tracking_forward_backward(self: Trainer, batch: Batch) -> float:
        with condition:
            started[0] = self.step
            condition.notify_all()
        return forward_backward(self, batch)

    def held_write_data(self: FileSystemWriter, *args: Any, **kwargs: Any) -> Any:
        match = re.search(r"step-(\d{8})", str(self.path))
        assert match is not None
        step = int(match.group(1))
        if threading.current_thread() is not threading.main_thread() and step + 1 < STEPS:
            with condition:  # step `step` is the first update after the save
                if condition.wait_for(lambda: started[0] > step, timeout=60):
                    overlapped.append(step)
        return write_data(self, *args, **kwargs)

    monkeypatch.setattr(Trainer, "forward_backward", tracking_forward_backward)
    monkeypatch.setattr(FileSystemWriter, "write_data", held_write_data)
    asynchronous = _fit(
        _overrides(shards, tmp_path / "async", "checkpoint.async_save=true", *extra)
    )
    assert overlapped == [3, 6], "the async writes did not overlap training"
    assert asynchronous.losses == sync.losses
    _assert_bit_identical(_weights(tmp_path / "async"), _weights(tmp_path / "sync"))
    names = sorted(p.name for p in (tmp_path / "sync" / "checkpoints").iterdir())
    assert names == [f"step-{s:08d}" for s in (3, 6, 9, 10)]
    assert sorted(p.name for p in (tmp_path / "async" / "checkpoints").iterdir()) == names
    for name in names:
        sync_dir, async_dir = (tmp_path / run / "checkpoints" / name for run in ("sync", "async"))
        _assert_same_checkpoint(
            _read_checkpoint(async_dir, tmp_path / "a.pt"),
            _read_checkpoint(sync_dir, tmp_path / "s.pt"),
            name,
        )
        assert (async_dir / "train_state.json").read_text() == (
            sync_dir / "train_state.json"
        ).read_text()

    monkeypatch.undo()
    for name in names[2:]:  # resume from the async step-6 checkpoint
        shutil.rmtree(tmp_path / "async" / "checkpoints" / name)
    resumed = _fit(_overrides(shards, tmp_path / "async", "checkpoint.async_save=true", *extra))
    assert resumed.losses == {s: sync.losses[s] for s in range(6, STEPS)}


def test_keep_last_prunes_but_keeps_annealing_snapshots_and_polyak_averages_them(
    shards: Path, tmp_path: Path
) -> None:
    """keep_last=2 leaves only the two newest regular checkpoints, every annealing snapshot under
    checkpoints/keep survives, and the exported model is their float64 mean."""
    steps = 12
    _fit(
        _overrides(
            shards,
            tmp_path,
            "checkpoint.interval=2",
            "checkpoint.keep_last=2",
            "anneal.steps=6",
            "anneal.checkpoint_interval=2",
            steps=steps,
        )
    )
    root = tmp_path / "checkpoints"
    assert sorted(p.name for p in root.iterdir()) == ["keep", "step-00000010", "step-00000012"]
    snapshots = sorted((root / "keep").iterdir())
    assert [p.name for p in snapshots] == ["step-00000008", "step-00000010", "step-00000012"]

    models = [_read_checkpoint(p, tmp_path / "c.pt")["model"] for p in snapshots]
    mean = {k: sum(m[k].double() for m in models) / len(models) for k in models[0]}
    exported = load_checkpoint(tmp_path / "model").state_dict()
    last = _read_checkpoint(root / "step-00000012", tmp_path / "c.pt")["model"]
    moved = 0.0
    for key, value in mean.items():
        torch.testing.assert_close(exported[key], value.float(), msg=key)
        moved = max(moved, (exported[key] - last[key]).abs().max().item())
    assert moved > 1e-5, "the export is the last checkpoint, not an average"


# --------------------------------------------------------------------------------- spikes
class Recorder:
    """Wraps `Trainer.forward_backward`: records the weights, optimizer step count and batch at
    the start of every step (before its update) and replaces the loss of chosen steps."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, inject: dict[int, float]) -> None:
        self.params: dict[int, dict[str, torch.Tensor]] = {}
        self.adam_steps: dict[int, float] = {}
        self.batches: dict[int, Batch] = {}
        self.losses: dict[int, float] = {}
        original = Trainer.forward_backward

        def forward_backward(trainer: Trainer, batch: Batch) -> float:
            step = trainer.step
            model = trainer.parts[0]
            self.params[step] = {n: p.detach().clone() for n, p in model.named_parameters()}
            state = trainer.optimizers[0].state
            first = next(iter(model.parameters()))
            self.adam_steps[step] = float(state[first]["step"]) if first in state else 0.0
            self.batches[step] = batch
            self.losses[step] = original(trainer, batch)  # real gradients are accumulated
            return inject.get(step, self.losses[step])

        monkeypatch.setattr(Trainer, "forward_backward", forward_backward)

    def same_params(self, a: int, b: int) -> bool:
        return all(torch.equal(v, self.params[b][k]) for k, v in self.params[a].items())


def _spike_overrides(shards: Path, out: Path, *extra: str) -> list[str]:
    return _overrides(shards, out, "spikes.min_history=3", "export=false", *extra)


def _events(out: Path) -> list[dict[str, Any]]:
    """The spike and rollback records of `out/events.jsonl` (not e.g. checkpoint_saved)."""
    records = map(json.loads, (out / "events.jsonl").read_text().splitlines())
    return [r for r in records if r["kind"] in ("spike_skipped", "rollback")]


def test_spike_and_nan_loss_skip_the_update(
    shards: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A spiking loss (step 5) and a NaN loss before any history exists (step 1) are skipped:
    weights and AdamW state stay as they were, the events are logged, training goes on."""
    rec = Recorder(monkeypatch, {1: float("nan"), 5: SPIKE})
    result = _fit(_spike_overrides(shards, tmp_path))
    assert result.skipped == [1, 5]
    assert result.rollbacks == []
    assert rec.same_params(2, 1) and rec.same_params(6, 5)
    assert rec.adam_steps[2] == rec.adam_steps[1] == 1  # step 0 updated, step 1 did not
    assert rec.adam_steps[6] == rec.adam_steps[5] == 4
    assert not rec.same_params(5, 4) and not rec.same_params(7, 6)  # ordinary steps do update
    assert [(e["step"], e["kind"]) for e in _events(tmp_path)] == [
        (1, "spike_skipped"),
        (5, "spike_skipped"),
    ]
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r["skipped"]] == [1, 5]


@pytest.mark.parametrize(
    "async_save",
    [False, True],
    ids=["sync_save", "async_save"],
)
def test_repeated_spikes_roll_back_to_the_last_checkpoint(
    shards: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, async_save: bool
) -> None:
    """max_consecutive=2 spikes in a row (steps 6, 7) restore the step-4 checkpoint's weights and
    optimizer state, while the data moves on: step 8 trains the checkpoint's weights on the batch
    an unspiked run sees at step 8."""
    extra = (
        "checkpoint.interval=4",
        "spikes.max_consecutive=2",
        f"checkpoint.async_save={str(async_save).lower()}",
    )
    clean = Recorder(monkeypatch, {})
    _fit(_spike_overrides(shards, tmp_path / "clean", *extra))
    monkeypatch.undo()
    rec = Recorder(monkeypatch, {6: SPIKE, 7: SPIKE})
    result = _fit(_spike_overrides(shards, tmp_path / "spiked", *extra))

    assert result.skipped == [6, 7]
    assert result.rollbacks == [7]
    assert rec.same_params(8, 4)  # the step-4 checkpoint: the state before step 4's update
    assert not rec.same_params(8, 6)
    assert rec.adam_steps[8] == rec.adam_steps[4] == 4
    for step in (8, 9):  # the data position did not roll back
        for field in ("tokens", "targets", "document_ids"):
            got, want = getattr(rec.batches[step], field), getattr(clean.batches[step], field)
            assert torch.equal(got, want), f"step {step} trained on another batch"
    model = Llama(_common.tiny_config())
    model.load_state_dict(rec.params[4])
    with torch.no_grad():
        expected = language_model_loss(model, rec.batches[8]).item()
    assert rec.losses[8] == pytest.approx(expected, rel=1e-6)
    events = _events(tmp_path / "spiked")
    assert [(e["step"], e["kind"]) for e in events] == [
        (6, "spike_skipped"),
        (7, "spike_skipped"),
        (7, "rollback"),
    ]
    assert events[-1]["checkpoint"].endswith("step-00000004")


def test_repeated_spikes_without_checkpoint_raise(
    shards: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Spikes that call for a rollback before any checkpoint exists stop the run with a
    FloatingPointError that says so."""
    Recorder(monkeypatch, {5: SPIKE, 6: SPIKE})
    overrides = _spike_overrides(
        shards, tmp_path, "checkpoint.interval=0", "spikes.max_consecutive=2"
    )
    with pytest.raises(FloatingPointError, match="no checkpoint to roll back to"):
        _fit(overrides)


def test_nan_loss_with_spike_handling_off_raises_naming_the_step(
    shards: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With spikes.enabled=false a NaN loss is an error naming its step, not a silent update."""
    rec = Recorder(monkeypatch, {3: float("nan")})
    with pytest.raises(FloatingPointError, match="at step 3"):
        _fit(_spike_overrides(shards, tmp_path, "spikes.enabled=false"))
    assert max(rec.params) == 3  # stopped at the NaN step


def test_non_finite_gradient_norm_is_skipped_like_a_nan_loss(
    shards: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A finite loss whose gradients overflowed (infinite norm) is skipped, not applied; with
    spike handling off it is an error naming the step."""
    real = Trainer.clip_gradients

    def overflow_at_step_4(self: Trainer) -> float:
        norm = real(self)
        return math.inf if self.step == 4 else norm

    monkeypatch.setattr(Trainer, "clip_gradients", overflow_at_step_4)
    assert _fit(_spike_overrides(shards, tmp_path / "on")).skipped == [4]
    with pytest.raises(FloatingPointError, match=r"gradient norm inf at step 4"):
        _fit(_spike_overrides(shards, tmp_path / "off", "spikes.enabled=false"))


def test_a_lasting_loss_level_shift_stops_after_one_futile_rollback(
    shards: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """When the loss jumps to a new level and stays there (not a spike), rolling back cannot help:
    after the first rollback the next streak stops the run with an error that says so, instead
    of skipping every step to the end and exporting a model that stopped learning."""
    real = Trainer.forward_backward

    def shifted(self: Trainer, batch: Batch) -> float:
        loss = real(self, batch)
        return loss * 2.0 if self.step >= 6 else loss

    monkeypatch.setattr(Trainer, "forward_backward", shifted)
    overrides = _spike_overrides(
        shards, tmp_path, "checkpoint.interval=4", "spikes.max_consecutive=2"
    )
    with pytest.raises(FloatingPointError, match="stayed above the spike threshold after rolling"):
        _fit(overrides)
    kinds = [e["kind"] for e in _events(tmp_path)]
    assert kinds == ["spike_skipped", "spike_skipped", "rollback", "spike_skipped", "spike_skipped"]
