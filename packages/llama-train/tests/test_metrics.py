"""Tests for llama_train.metrics: JSONL/TensorBoard logs, events, resume truncation, plots, MFU.

Oracles: the JSONL files are read back with `json`, TensorBoard files with TensorBoard's own
`EventAccumulator`, PNGs by their signature and their decoded pixels, MFU by hand arithmetic,
peak FLOP/s against NVIDIA's datasheet numbers, and max RSS against Linux's `/proc/self/status`.
"""

from __future__ import annotations

import json
import logging
import math
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from llama_train.metrics import (
    MetricsLogger,
    _peak_flops_for_name,
    memory_stats,
    model_flops_utilization,
    peak_flops,
    plot_loss_curve,
    read_jsonl,
)

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _lines(path: Path) -> list[dict[str, object]]:
    """Independent reader: every line must be a complete JSON object."""
    text = path.read_text(encoding="utf-8")
    assert text.endswith("\n"), "every record must end with a newline"
    return [json.loads(line) for line in text.splitlines()]


def _log_steps(out: Path, steps: range, **kwargs: object) -> None:
    with MetricsLogger(out, tensorboard=False, **kwargs) as metrics:  # type: ignore[arg-type]
        for step in steps:
            metrics.log(step, {"loss": 10.0 - step, "lr": 1e-3 * step})
            metrics.event(step, "checkpoint_saved", f"saved step {step}")


def _png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE, "not a PNG file"
    assert data[12:16] == b"IHDR"
    width, height = struct.unpack(">II", data[16:24])
    return width, height


def test_log_writes_one_flushed_json_line_per_step(tmp_path: Path) -> None:
    """Each log() call is on disk as one JSON line before close (a kill loses nothing)."""
    metrics = MetricsLogger(tmp_path, tensorboard=False)
    metrics.log(0, {"loss": 2.5, "lr": 1e-4})
    metrics.log(1, {"loss": 2.25, "grad_norm": torch.tensor(0.5)})  # type: ignore[dict-item]
    records = _lines(tmp_path / "metrics.jsonl")  # read while the logger is still open
    assert [r["step"] for r in records] == [0, 1]
    assert records[0]["loss"] == 2.5 and records[0]["lr"] == 1e-4
    assert records[1]["grad_norm"] == 0.5
    assert all(isinstance(r["time"], float) for r in records)
    metrics.close()


def test_log_keeps_non_finite_values(tmp_path: Path) -> None:
    """A NaN loss is recorded as NaN (Python's json reads it back), not dropped."""
    with MetricsLogger(tmp_path, tensorboard=False) as metrics:
        metrics.log(0, {"loss": float("nan")})
        metrics.log(1, {"loss": 1.0})
    assert math.isnan(_lines(tmp_path / "metrics.jsonl")[0]["loss"])  # type: ignore[arg-type]


def test_tensorboard_scalars_readable(tmp_path: Path) -> None:
    """TensorBoard's own reader sees every scalar at its step."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    with MetricsLogger(tmp_path) as metrics:
        for step in range(5):
            metrics.log(step, {"loss": 3.0 - 0.5 * step, "lr": 1e-3})
    accumulator = EventAccumulator(str(tmp_path / "tensorboard"))
    accumulator.Reload()
    assert set(accumulator.Tags()["scalars"]) == {"loss", "lr"}
    loss = accumulator.Scalars("loss")
    assert [e.step for e in loss] == [0, 1, 2, 3, 4]
    assert [e.value for e in loss] == pytest.approx([3.0, 2.5, 2.0, 1.5, 1.0])


def test_resume_drops_steps_at_or_after_resume_step(tmp_path: Path) -> None:
    """Resuming at step 6 drops the killed run's records for steps 6-9 and appends after 5."""
    _log_steps(tmp_path, range(10))
    with MetricsLogger(tmp_path, tensorboard=False, resume_step=6) as metrics:
        assert [r["step"] for r in _lines(tmp_path / "metrics.jsonl")] == [0, 1, 2, 3, 4, 5]
        assert [r["step"] for r in _lines(tmp_path / "events.jsonl")] == [0, 1, 2, 3, 4, 5]
        metrics.log(6, {"loss": 4.0})
    steps = [r["step"] for r in _lines(tmp_path / "metrics.jsonl")]
    assert steps == [0, 1, 2, 3, 4, 5, 6]
    assert _lines(tmp_path / "metrics.jsonl")[-1]["loss"] == 4.0


def test_resume_drops_torn_final_line(tmp_path: Path) -> None:
    """A line cut short by a kill mid-write is dropped on resume; complete lines are kept."""
    _log_steps(tmp_path, range(3))
    with (tmp_path / "metrics.jsonl").open("a") as handle:
        handle.write('{"step": 3, "lo')  # no newline: the process died here
    with MetricsLogger(tmp_path, tensorboard=False, resume_step=3) as metrics:
        metrics.log(3, {"loss": 7.0})
    assert [r["step"] for r in _lines(tmp_path / "metrics.jsonl")] == [0, 1, 2, 3]
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temporary


def test_corrupt_middle_line_fails_naming_file_and_line(tmp_path: Path) -> None:
    """A broken line that is not the last one is not silently dropped: the error names it."""
    (tmp_path / "metrics.jsonl").write_text('{"step": 0}\nnot json\n{"step": 2}\n')
    with pytest.raises(ValueError, match=r"metrics\.jsonl:2 is not valid JSON"):
        MetricsLogger(tmp_path, tensorboard=False, resume_step=1)


def test_fresh_run_replaces_earlier_records_with_a_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Without resume_step, an earlier run's records are dropped and the drop is logged."""
    _log_steps(tmp_path, range(4))
    with caplog.at_level(logging.WARNING, logger="llama_train.metrics"):
        MetricsLogger(tmp_path, tensorboard=False).close()
    assert (tmp_path / "metrics.jsonl").read_text() == ""
    assert "dropped 4 records of an earlier run" in caplog.text


def test_resume_does_not_rewrite_file_with_nothing_to_drop(tmp_path: Path) -> None:
    """Resuming past the last logged step keeps the file byte for byte."""
    _log_steps(tmp_path, range(3))
    before = (tmp_path / "metrics.jsonl").read_bytes()
    MetricsLogger(tmp_path, tensorboard=False, resume_step=3).close()
    assert (tmp_path / "metrics.jsonl").read_bytes() == before


def test_resume_purges_tensorboard_steps(tmp_path: Path) -> None:
    """TensorBoard shows the resumed run's value at a replayed step, not the killed run's."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    with MetricsLogger(tmp_path) as metrics:
        for step in range(6):
            metrics.log(step, {"loss": 100.0 + step})
    with MetricsLogger(tmp_path, resume_step=3) as metrics:
        for step in range(3, 6):
            metrics.log(step, {"loss": float(step)})
    accumulator = EventAccumulator(str(tmp_path / "tensorboard"))
    accumulator.Reload()
    loss = [(e.step, e.value) for e in accumulator.Scalars("loss")]
    assert loss == [(0, 100.0), (1, 101.0), (2, 102.0), (3, 3.0), (4, 4.0), (5, 5.0)]


def test_rewind_drops_metrics_keeps_events(tmp_path: Path) -> None:
    """After a rollback to step 2, metrics (JSONL and TensorBoard) restart at 2; events stay."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    with MetricsLogger(tmp_path) as metrics:
        for step in range(5):
            metrics.log(step, {"loss": 1.0})
        metrics.event(4, "rollback", "repeated spikes", to_step=2)
        metrics.rewind(2)
        metrics.log(2, {"loss": 0.5})
    assert [r["step"] for r in _lines(tmp_path / "metrics.jsonl")] == [0, 1, 2]
    assert _lines(tmp_path / "metrics.jsonl")[-1]["loss"] == 0.5
    assert [r["kind"] for r in _lines(tmp_path / "events.jsonl")] == ["rollback"]
    accumulator = EventAccumulator(str(tmp_path / "tensorboard"))
    accumulator.Reload()
    assert [(e.step, e.value) for e in accumulator.Scalars("loss")] == [
        (0, 1.0),
        (1, 1.0),
        (2, 0.5),
    ]


def test_step_going_backwards_is_rejected(tmp_path: Path) -> None:
    """Logging an earlier step without rewind() fails and says what to call."""
    with MetricsLogger(tmp_path, tensorboard=False) as metrics:
        metrics.log(5, {"loss": 1.0})
        with pytest.raises(ValueError, match=r"step 3 is before the last logged step 5.*rewind"):
            metrics.log(3, {"loss": 1.0})


def test_reserved_and_non_numeric_metric_names_rejected(tmp_path: Path) -> None:
    """'step' is reserved and a string value is rejected, both by name."""
    with MetricsLogger(tmp_path, tensorboard=False) as metrics:
        with pytest.raises(ValueError, match="'step' is reserved"):
            metrics.log(0, {"step": 1.0})
        with pytest.raises(TypeError, match="metric 'loss' at step 0 must be a number"):
            metrics.log(0, {"loss": "low"})  # type: ignore[dict-item]


def test_event_written_to_jsonl_and_log(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """An event is one JSON line with its fields, and one log record at the given level."""
    with (
        caplog.at_level(logging.INFO, logger="llama_train.metrics"),
        MetricsLogger(tmp_path, tensorboard=False) as metrics,
    ):
        metrics.event(
            7,
            "loss_spike_skipped",
            "loss 9.1 > 3 x running mean",
            level=logging.WARNING,
            loss=torch.tensor(9.1),
            path=tmp_path / "ckpt",
        )
    (record,) = _lines(tmp_path / "events.jsonl")
    assert record["step"] == 7 and record["kind"] == "loss_spike_skipped"
    assert record["message"] == "loss 9.1 > 3 x running mean"
    assert record["loss"] == pytest.approx(9.1)
    assert record["path"] == str(tmp_path / "ckpt")
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "[loss_spike_skipped]" in warnings[0].getMessage()


def test_event_rejects_unserialisable_field(tmp_path: Path) -> None:
    """A field JSON cannot hold is rejected by name before anything is written."""
    with (
        MetricsLogger(tmp_path, tensorboard=False) as metrics,
        pytest.raises(TypeError, match=r"event field 'model' .* not JSON-serialisable"),
    ):
        metrics.event(0, "x", "y", model=object())
    assert (tmp_path / "events.jsonl").read_text() == ""


def test_disabled_logger_is_a_no_op(tmp_path: Path) -> None:
    """enabled=False (non-zero ranks) creates no files and accepts every call."""
    out = tmp_path / "rank1"
    metrics = MetricsLogger(out, enabled=False)
    metrics.log(0, {"loss": 1.0})
    metrics.event(0, "checkpoint_saved", "x")
    metrics.rewind(0)
    assert metrics.close() is None
    assert not out.exists()


def test_close_writes_loss_curve_png_with_both_lines(tmp_path: Path) -> None:
    """close() writes loss.png: a valid 800x450 PNG with the blue loss and orange lr lines."""
    import matplotlib.image

    with MetricsLogger(tmp_path, tensorboard=False) as metrics:
        for step in range(50):
            metrics.log(step, {"loss": 5.0 * math.exp(-step / 20), "lr": 1e-3 * min(1, step / 10)})
    png = tmp_path / "loss.png"
    assert _png_size(png) == (800, 450)
    assert png.stat().st_size > 10_000
    pixels = matplotlib.image.imread(png)[..., :3]  # [H, W, RGB] in [0, 1]
    blue = np.array([0x1F, 0x77, 0xB4]) / 255  # matplotlib "tab:blue"
    orange = np.array([0xFF, 0x7F, 0x0E]) / 255  # "tab:orange"
    assert (np.abs(pixels - blue).max(axis=-1) < 0.05).sum() > 200
    assert (np.abs(pixels - orange).max(axis=-1) < 0.05).sum() > 200


def test_close_without_loss_writes_no_png(tmp_path: Path) -> None:
    """With nothing to plot, close() returns None and leaves no PNG."""
    with MetricsLogger(tmp_path, tensorboard=False) as metrics:
        metrics.log(0, {"tokens_per_s": 10.0})
    assert metrics.close() is None
    assert not (tmp_path / "loss.png").exists()


def test_plot_loss_curve_standalone_and_without_lr(tmp_path: Path) -> None:
    """plot_loss_curve reads a JSONL with no lr and writes only the loss line."""
    import matplotlib.image

    jsonl = tmp_path / "m.jsonl"
    jsonl.write_text(
        "".join(json.dumps({"step": s, "loss": 3.0 / (s + 1)}) + "\n" for s in range(9))
    )
    png = plot_loss_curve(jsonl, tmp_path / "sub" / "curve.png")
    assert png == tmp_path / "sub" / "curve.png"
    assert _png_size(png) == (800, 450)
    pixels = matplotlib.image.imread(png)[..., :3]
    orange = np.array([0xFF, 0x7F, 0x0E]) / 255
    assert (np.abs(pixels - orange).max(axis=-1) < 0.05).sum() == 0
    assert not (tmp_path / "sub" / "curve.png.tmp").exists()
    assert list((tmp_path / "sub").iterdir()) == [png]  # no temporary file of any name left


def test_plot_loss_curve_without_loss_fails(tmp_path: Path) -> None:
    """A JSONL with no loss values is an error naming the key."""
    jsonl = tmp_path / "m.jsonl"
    jsonl.write_text('{"step": 0, "lr": 0.1}\n')
    with pytest.raises(ValueError, match="no finite 'loss' values"):
        plot_loss_curve(jsonl, tmp_path / "x.png")


def test_read_jsonl_missing_file_is_empty(tmp_path: Path) -> None:
    """A run that never logged has no records, not an error."""
    assert read_jsonl(tmp_path / "absent.jsonl") == []


def test_mfu_hand_arithmetic() -> None:
    """4,000 tokens/s x 6e9 FLOPs/token on a 312e12 FLOP/s A100 is 2.4e13/3.12e14 = 1/13."""
    assert model_flops_utilization(4_000.0, 6e9, 312e12) == pytest.approx(1 / 13, rel=1e-12)
    assert model_flops_utilization(0.0, 6e9, 312e12) == 0.0


def test_mfu_rejects_bad_peak() -> None:
    """A zero peak (unknown device) is rejected by value rather than dividing by zero."""
    with pytest.raises(ValueError, match="peak_flops_per_s must be finite and > 0, got 0"):
        model_flops_utilization(1.0, 1.0, 0.0)
    with pytest.raises(ValueError, match="tokens_per_s must be finite and >= 0, got -1"):
        model_flops_utilization(-1.0, 1.0, 1.0)


@pytest.mark.parametrize(
    ("device_name", "dtype", "expected"),
    [
        ("NVIDIA H100 80GB HBM3", torch.bfloat16, 989.4e12),  # SXM: 1,979 sparse / 2
        ("NVIDIA H100 PCIe", torch.bfloat16, 756.5e12),  # 1,513 sparse / 2
        ("NVIDIA H100 NVL", torch.float16, 835.5e12),  # 1,671 sparse / 2
        ("NVIDIA H200", torch.bfloat16, 989.4e12),
        ("NVIDIA A100-SXM4-80GB", torch.bfloat16, 312e12),
        ("NVIDIA H100 80GB HBM3", torch.float8_e4m3fn, 1978.8e12),  # fp8: twice bf16
        ("NVIDIA A100-SXM4-80GB", torch.float8_e4m3fn, None),  # Ampere has no fp8
        ("NVIDIA H100 80GB HBM3", torch.float32, None),  # TF32 or not: no single peak
        ("Tesla T4", torch.bfloat16, None),  # not in the table
    ],
)
def test_peak_flops_by_device_name(
    device_name: str, dtype: torch.dtype, expected: float | None
) -> None:
    """Device names map to NVIDIA's dense datasheet peaks; unknown combinations to None."""
    assert _peak_flops_for_name(device_name, dtype) == expected


def test_peak_flops_unknown_on_cpu() -> None:
    """A CPU has no known peak."""
    assert peak_flops(torch.device("cpu"), torch.bfloat16) is None


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_peak_flops_and_memory_on_cuda() -> None:
    """On a lent H100/H200 the bf16 peak is 989.4e12 and CUDA memory stats are reported."""
    device = torch.device("cuda")
    name = torch.cuda.get_device_name(device)
    if "H100" in name or "H200" in name:
        assert peak_flops(device, torch.bfloat16) in (989.4e12, 835.5e12, 756.5e12)
    x = torch.empty(2**28, dtype=torch.uint8, device=device)  # 0.25 GiB
    stats = memory_stats(device)
    del x
    assert stats["memory_max_allocated_gib"] >= 0.25
    assert stats["memory_max_reserved_gib"] >= stats["memory_max_allocated_gib"]


def test_memory_stats_cpu_matches_proc_status() -> None:
    """On CPU the max RSS agrees with Linux's VmHWM (peak resident set) within 10%."""
    status = Path("/proc/self/status")
    if not status.exists():
        pytest.skip("needs Linux /proc")
    stats = memory_stats(torch.device("cpu"))
    vm_hwm_kib = next(
        int(line.split()[1]) for line in status.read_text().splitlines() if line.startswith("VmHWM")
    )
    assert set(stats) == {"memory_max_rss_gib"}
    assert stats["memory_max_rss_gib"] == pytest.approx(vm_hwm_kib / 2**20, rel=0.1)
