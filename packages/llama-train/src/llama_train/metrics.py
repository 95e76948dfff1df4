"""Training metrics: JSONL and TensorBoard logs, notable events, a loss-curve PNG, MFU and memory.

`MetricsLogger` is the one object a training loop talks to. Each `log(step, values)` appends one
JSON line to `out_dir/metrics.jsonl` (flushed at once, so a killed run loses nothing it logged) and
writes the same values as TensorBoard scalars under `out_dir/tensorboard`. `event(...)` records the
things a person will want to find later — a loss spike skipped, a rollback, a checkpoint saved —
in `out_dir/events.jsonl` and in the `logging` log. `close()` draws `out_dir/loss.png`.

Resuming: a run killed after its last checkpoint has already logged steps that the resumed run will
execute again. `MetricsLogger(out_dir, resume_step=s)` drops every record with `step >= s` from
both JSONL files (rewriting them atomically) before appending, and tells TensorBoard to purge the
same steps, so the logs read as one uninterrupted run. `rewind(s)` does the same mid-run (after a
rollback), keeping the events, which are history.

Throughput in the units the hardware is sold in: model FLOPs utilisation (MFU, PaLM appendix B;
Chowdhery et al. 2022) is achieved model FLOP/s over the accelerator's dense peak
(`model_flops_utilization`, `peak_flops`); the FLOPs per token come from
`llama_model.flops_per_token`.
"""

from __future__ import annotations

import json
import logging
import math
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

import torch

from llama_model import atomic_write

if TYPE_CHECKING:
    from torch.utils.tensorboard import SummaryWriter

__all__ = [
    "METRICS_FILE",
    "EVENTS_FILE",
    "LOSS_PLOT_FILE",
    "TENSORBOARD_DIR",
    "PEAK_BF16_FLOPS",
    "MetricsLogger",
    "plot_loss_curve",
    "read_jsonl",
    "model_flops_utilization",
    "peak_flops",
    "memory_stats",
]

logger = logging.getLogger(__name__)

METRICS_FILE = "metrics.jsonl"
EVENTS_FILE = "events.jsonl"
LOSS_PLOT_FILE = "loss.png"
TENSORBOARD_DIR = "tensorboard"
_RESERVED_KEYS = frozenset({"step", "time"})  # written by the logger itself into every record

# Dense (no 2:4 sparsity) bf16 tensor-core peaks in FLOP/s, from NVIDIA's datasheets (the sparse
# figure halved). Matched as substrings of `torch.cuda.get_device_name`, first match wins, so the
# H100 variants come before plain "H100" (the SXM part reports itself as "NVIDIA H100 80GB HBM3").
PEAK_BF16_FLOPS: Mapping[str, float] = {
    "H200": 989.4e12,  # H200 SXM datasheet: 1,979 TFLOPS bf16 with sparsity
    "H100 NVL": 835.5e12,  # H100 NVL datasheet: 1,671 TFLOPS bf16 with sparsity
    "H100 PCIe": 756.5e12,  # H100 PCIe datasheet: 1,513 TFLOPS bf16 with sparsity
    "H100": 989.4e12,  # H100 SXM datasheet: 1,979 TFLOPS bf16 with sparsity
    "A100": 312e12,  # A100 datasheet: 312 TFLOPS bf16 dense
}
_FP8_CAPABLE = ("H200", "H100")  # Hopper: fp8 tensor cores at twice the bf16 rate; A100 has none
_FP8_DTYPES = frozenset({torch.float8_e4m3fn, torch.float8_e5m2})


class MetricsLogger:
    """Per-step metrics to JSONL + TensorBoard, events to JSONL + `logging`, a loss PNG on close.

    Args:
        out_dir: directory for `metrics.jsonl`, `events.jsonl`, `tensorboard/` and `loss.png`
            (created if missing).
        tensorboard: also write TensorBoard scalars.
        enabled: False makes every method a no-op that touches no file (for non-zero ranks).
        resume_step: the first step this run will log when resuming from a checkpoint; records
            with `step >= resume_step` left by the killed run are dropped. None starts a fresh
            run: records of an earlier run in `out_dir` are dropped (the count is logged).
        loss_key, lr_key: the value names `close()` plots on the loss curve.
    """

    def __init__(
        self,
        out_dir: Path,
        *,
        tensorboard: bool = True,
        enabled: bool = True,
        resume_step: int | None = None,
        loss_key: str = "loss",
        lr_key: str = "lr",
    ) -> None:
        self.out_dir = Path(out_dir)
        self.enabled = enabled
        self.loss_key = loss_key
        self.lr_key = lr_key
        self._tensorboard = tensorboard
        self._writer: SummaryWriter | None = None
        self._metrics: TextIO | None = None
        self._events: TextIO | None = None
        self._last_step: int | None = None
        self._closed = False
        if not enabled:
            return
        if resume_step is not None and resume_step < 0:
            raise ValueError(f"resume_step must be >= 0, got {resume_step}")
        self.out_dir.mkdir(parents=True, exist_ok=True)
        cutoff = 0 if resume_step is None else resume_step
        for name in (METRICS_FILE, EVENTS_FILE):
            kept, dropped, last = _truncate_jsonl(self.out_dir / name, cutoff)
            if dropped and resume_step is None:
                logger.warning(
                    "fresh run: dropped %d records of an earlier run from %s "
                    "(pass resume_step to keep them when resuming)",
                    dropped,
                    self.out_dir / name,
                )
            elif dropped:
                logger.info(
                    "resuming at step %d: dropped %d records with step >= %d from %s",
                    resume_step,
                    dropped,
                    resume_step,
                    self.out_dir / name,
                )
            if name == METRICS_FILE and kept:
                self._last_step = last
        self._metrics = (self.out_dir / METRICS_FILE).open("a", encoding="utf-8")
        self._events = (self.out_dir / EVENTS_FILE).open("a", encoding="utf-8")
        if tensorboard:
            self._writer = _summary_writer(self.out_dir / TENSORBOARD_DIR, purge_step=cutoff)

    @property
    def metrics_path(self) -> Path:
        """`out_dir/metrics.jsonl`."""
        return self.out_dir / METRICS_FILE

    @property
    def events_path(self) -> Path:
        """`out_dir/events.jsonl`."""
        return self.out_dir / EVENTS_FILE

    def log(self, step: int, values: Mapping[str, float]) -> None:
        """Append `{"step": step, "time": <unix s>, **values}` to metrics.jsonl and TensorBoard.

        Steps must not go backwards (use `rewind` after a rollback); values must convert with
        `float()` (Python numbers, numpy scalars, one-element tensors). Non-finite values are
        written as JSON `NaN`/`Infinity`, which Python's `json` reads back.
        """
        if not self.enabled:
            return
        self._check_open()
        if self._last_step is not None and step < self._last_step:
            raise ValueError(
                f"step {step} is before the last logged step {self._last_step}; "
                f"call rewind({step}) first if the run rolled back"
            )
        record: dict[str, Any] = {"step": int(step), "time": time.time()}
        for key, value in values.items():
            if key in _RESERVED_KEYS:
                raise ValueError(
                    f"metric name {key!r} is reserved (the logger writes it); rename the metric"
                )
            try:
                record[key] = float(value)
            except (TypeError, ValueError) as error:
                raise TypeError(
                    f"metric {key!r} at step {step} must be a number, got {value!r}"
                ) from error
        _append_line(self._metrics, record)
        self._last_step = step
        if self._writer is not None:
            for key, value in record.items():
                if key not in _RESERVED_KEYS:
                    self._writer.add_scalar(key, value, global_step=step)

    def event(
        self, step: int, kind: str, message: str, *, level: int = logging.INFO, **fields: Any
    ) -> None:
        """Record a notable event in events.jsonl and the log at `level`.

        `kind` is a short machine-readable tag ("loss_spike_skipped", "rollback",
        "checkpoint_saved"); `message` is for a person; `fields` are extra JSON-serialisable
        details (numbers, strings, paths, one-element tensors).
        """
        if not self.enabled:
            return
        self._check_open()
        reserved = (_RESERVED_KEYS | {"kind", "message"}) & fields.keys()
        if reserved:
            raise ValueError(f"event field names {sorted(reserved)} are reserved; rename them")
        record = {"step": int(step), "time": time.time(), "kind": kind, "message": message}
        record.update({key: _jsonable(key, value) for key, value in fields.items()})
        _append_line(self._events, record)
        details = "".join(f" {key}={value}" for key, value in fields.items())
        logger.log(level, "step %d [%s] %s%s", step, kind, message, details)

    def rewind(self, step: int) -> None:
        """Drop metric records with `step >= step` (after a rollback); events are kept."""
        if not self.enabled:
            return
        self._check_open()
        assert self._metrics is not None
        self._metrics.close()
        kept, dropped, last = _truncate_jsonl(self.metrics_path, step)
        self._last_step = last if kept else None
        self._metrics = self.metrics_path.open("a", encoding="utf-8")
        if self._writer is not None:
            self._writer.close()
            self._writer = _summary_writer(self.out_dir / TENSORBOARD_DIR, purge_step=step)
        logger.info("rewound metrics to step %d: dropped %d records", step, dropped)

    def close(self) -> Path | None:
        """Close the files and write `out_dir/loss.png`; return its path (None if nothing to plot).

        Safe to call twice; the second call does nothing.
        """
        if not self.enabled or self._closed:
            return None
        self._closed = True
        for handle in (self._metrics, self._events):
            if handle is not None:
                handle.close()
        if self._writer is not None:
            self._writer.close()
        has_loss = any(
            _is_finite_number(record.get(self.loss_key)) for record in read_jsonl(self.metrics_path)
        )
        if not has_loss:
            logger.info(
                "no %r values in %s; no loss plot written", self.loss_key, self.metrics_path
            )
            return None
        return plot_loss_curve(
            self.metrics_path,
            self.out_dir / LOSS_PLOT_FILE,
            loss_key=self.loss_key,
            lr_key=self.lr_key,
        )

    def __enter__(self) -> MetricsLogger:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError(f"MetricsLogger for {self.out_dir} is closed")


def _summary_writer(log_dir: Path, purge_step: int) -> SummaryWriter:
    # Imported here: tensorboard is heavy and only the logging rank needs it.
    from torch.utils.tensorboard import SummaryWriter

    # purge_step hides events at steps >= purge_step that an earlier (killed) writer left behind.
    return SummaryWriter(log_dir=str(log_dir), purge_step=purge_step, flush_secs=30)


def _append_line(handle: TextIO | None, record: Mapping[str, Any]) -> None:
    assert handle is not None
    handle.write(json.dumps(record) + "\n")
    handle.flush()  # survives a killed process (not a power cut: no fsync per step)


def _jsonable(key: str, value: Any) -> Any:
    if value is None or isinstance(value, bool | int | float | str):
        return value
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        return value.item()
    if isinstance(value, list | tuple):
        return [_jsonable(key, item) for item in value]
    if hasattr(value, "item"):  # numpy scalars
        return value.item()
    raise TypeError(
        f"event field {key!r} = {value!r} ({type(value).__name__}) is not JSON-serialisable; "
        "pass a number, string, path or list of them"
    )


def _is_finite_number(value: object) -> bool:
    return isinstance(value, int | float) and math.isfinite(value)


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """Records of a JSONL file written by `MetricsLogger`; [] if it does not exist.

    A final line without its newline (a write cut short by a kill) is skipped; any other line
    that is not a JSON object raises `ValueError` naming the file and line.
    """
    records, _ = _read_records(Path(path))
    return records


def _read_records(path: Path) -> tuple[list[dict[str, Any]], bool]:
    """(records, whether a torn final line was skipped)."""
    if not path.exists():
        return [], False
    text = path.read_text(encoding="utf-8")
    lines = text.split("\n")
    torn = lines.pop()  # "" when the file ends with a newline, else a line cut short
    records = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            raise ValueError(
                f"{path}:{number} is not valid JSON ({error}); fix or delete that line"
            ) from error
        if not isinstance(record, dict) or not isinstance(record.get("step"), int):
            raise ValueError(f"{path}:{number} is not a record with an integer 'step': {line!r}")
        records.append(record)
    return records, bool(torn.strip())


def _truncate_jsonl(path: Path, cutoff: int) -> tuple[int, int, int | None]:
    """Keep records with step < cutoff; rewrite atomically. Returns (kept, dropped, last step)."""
    records, torn = _read_records(path)
    if torn:
        logger.warning("%s: skipped a final line cut short by a killed write", path)
    kept = [record for record in records if record["step"] < cutoff]
    dropped = len(records) - len(kept)
    if dropped or torn:
        with atomic_write(path) as tmp:  # a crash before the end leaves the old file intact
            tmp.write_text("".join(json.dumps(record) + "\n" for record in kept), encoding="utf-8")
    last = max((record["step"] for record in kept), default=None)
    return len(kept), dropped, last


def plot_loss_curve(
    metrics_jsonl: Path, png: Path, *, loss_key: str = "loss", lr_key: str = "lr"
) -> Path:
    """Plot loss against step from a metrics JSONL, with the learning rate on a twin axis.

    Records without a finite `loss_key` are skipped; the learning-rate axis is drawn when any
    record has `lr_key`. The PNG is written to a temporary name and renamed
    (`llama_model.atomic_write`), so an existing plot is replaced only by a complete one. Returns
    `png`.
    """
    # Imported here so that importing llama_train does not pull in matplotlib. The Agg canvas is
    # used directly: no pyplot, no global backend, no display.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    records = read_jsonl(Path(metrics_jsonl))
    loss = [(r["step"], r[loss_key]) for r in records if _is_finite_number(r.get(loss_key))]
    if not loss:
        raise ValueError(
            f"{metrics_jsonl} has no finite {loss_key!r} values to plot "
            f"({len(records)} records); log {loss_key!r} or pass loss_key="
        )
    lr = [(r["step"], r[lr_key]) for r in records if _is_finite_number(r.get(lr_key))]

    figure = Figure(figsize=(8, 4.5), dpi=100)
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    steps, values = zip(*loss, strict=True)
    axes.plot(steps, values, color="tab:blue", linewidth=1.2, label=loss_key)
    axes.set_xlabel("step")
    axes.set_ylabel(loss_key, color="tab:blue")
    axes.grid(alpha=0.3)
    if lr:
        lr_axes = axes.twinx()
        lr_steps, lr_values = zip(*lr, strict=True)
        lr_axes.plot(lr_steps, lr_values, color="tab:orange", linewidth=1.0, label=lr_key)
        lr_axes.set_ylabel("learning rate", color="tab:orange")
        lr_axes.ticklabel_format(axis="y", style="sci", scilimits=(-3, 3))
    axes.set_title(f"{loss_key} vs step ({len(loss)} points)")
    figure.tight_layout()
    return _save_png(figure, Path(png))


def _save_png(figure: Any, png: Path) -> Path:
    with atomic_write(png) as tmp:
        figure.savefig(tmp, format="png")
    return png


def model_flops_utilization(
    tokens_per_s: float, flops_per_token: float, peak_flops_per_s: float
) -> float:
    """MFU = tokens/s · model FLOPs per token / peak FLOP/s (a fraction; 0.4 means 40%).

    `flops_per_token` is training FLOPs (forward + backward), e.g. `llama_model.flops_per_token`;
    `tokens_per_s` and `peak_flops_per_s` must describe the same devices (per GPU, or all GPUs).
    """
    if not (math.isfinite(peak_flops_per_s) and peak_flops_per_s > 0):
        raise ValueError(f"peak_flops_per_s must be finite and > 0, got {peak_flops_per_s}")
    for name, value in (("tokens_per_s", tokens_per_s), ("flops_per_token", flops_per_token)):
        if not (math.isfinite(value) and value >= 0):
            raise ValueError(f"{name} must be finite and >= 0, got {value}")
    return tokens_per_s * flops_per_token / peak_flops_per_s


def peak_flops(device: torch.device, dtype: torch.dtype) -> float | None:
    """Dense peak FLOP/s of one `device` for matmuls in `dtype`; None when not known.

    Known: NVIDIA A100, H100 (SXM, PCIe, NVL) and H200, for bf16/fp16 (and fp8 on H100/H200, at
    twice the bf16 rate). None for CPUs, other GPUs and other dtypes (fp32 has no single peak: it
    depends on whether TF32 is allowed) — pass a configured peak instead.
    """
    if device.type != "cuda" or not torch.cuda.is_available():
        return None
    return _peak_flops_for_name(torch.cuda.get_device_name(device), dtype)


def _peak_flops_for_name(device_name: str, dtype: torch.dtype) -> float | None:
    for key, bf16_peak in PEAK_BF16_FLOPS.items():
        if key in device_name:
            if dtype in (torch.bfloat16, torch.float16):
                return bf16_peak
            if dtype in _FP8_DTYPES and key.startswith(_FP8_CAPABLE):
                return 2 * bf16_peak
            return None
    return None


def memory_stats(device: torch.device) -> dict[str, float]:
    """Peak memory in GiB: CUDA max allocated/reserved on `device`, else the process's max RSS.

    Keys: `memory_max_allocated_gib` and `memory_max_reserved_gib` on CUDA,
    `memory_max_rss_gib` elsewhere ({} where the `resource` module is missing, i.e. Windows).
    """
    gib = float(2**30)
    if device.type == "cuda":
        return {
            "memory_max_allocated_gib": torch.cuda.max_memory_allocated(device) / gib,
            "memory_max_reserved_gib": torch.cuda.max_memory_reserved(device) / gib,
        }
    try:
        import resource
    except ImportError:  # pragma: no cover - Windows
        return {}
    max_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    bytes_per_unit = 1 if sys.platform == "darwin" else 1024  # macOS: bytes; Linux: KiB
    return {"memory_max_rss_gib": max_rss * bytes_per_unit / gib}
