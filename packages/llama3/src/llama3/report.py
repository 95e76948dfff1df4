"""The demo's report: `report.md` and its PNG plots, from what each stage left in its directory.

Plots are drawn with matplotlib's Agg backend (no display needed) from the metrics files the
trainers write (`llama_train.METRICS_FILE`: one JSON object per logged step).
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from llama_model import atomic_write
from llama_train import METRICS_FILE

__all__ = ["read_metrics", "write_report"]


def _f(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2f}"


def read_metrics(run_dir: Path, key: str) -> tuple[list[int], list[float]]:
    """Steps and values of `key` in ``run_dir/metrics.jsonl`` (steps without it are skipped)."""
    steps: list[int] = []
    values: list[float] = []
    path = run_dir / METRICS_FILE
    if not path.is_file():
        return steps, values
    for line in path.read_text(encoding="utf-8").splitlines():
        record = json.loads(line)
        value = record.get(key)
        if isinstance(value, int | float) and math.isfinite(value):
            steps.append(int(record["step"]))
            values.append(float(value))
    return steps, values


def _plot(
    png: Path,
    title: str,
    ylabel: str,
    curves: Sequence[tuple[str, list[int], list[float]]],
    lines: Mapping[str, float | None] = {},
) -> Path | None:
    """One figure: a curve per training metric and a dashed horizontal line per reference."""
    if not any(steps for _, steps, _ in curves):
        return None
    import matplotlib

    matplotlib.use("Agg")  # no display: the figure goes to a file
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.6), dpi=110)
    for label, steps, values in curves:
        ax.plot(steps, values, label=label, linewidth=1.2)
    for (label, value), color in zip(
        lines.items(), ("tab:red", "tab:green", "tab:purple"), strict=False
    ):
        if value is None:  # nothing was measured (e.g. no held-out data)
            continue
        ax.axhline(value, linestyle="--", color=color, linewidth=1, label=label)
    ax.set(title=title, xlabel="step", ylabel=ylabel)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    png.parent.mkdir(parents=True, exist_ok=True)
    with atomic_write(png) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)
    return png


@dataclass(frozen=True)
class _PlotSpec:
    """One stage's plot: its metric curve and the held-out figures drawn as lines."""

    file: str
    title: str
    ylabel: str
    metric: str
    curve_label: str
    lines: tuple[tuple[str, str], ...]  # (label, key in the stage's results)


PLOTS: dict[str, _PlotSpec] = {
    "pretrain": _PlotSpec(
        "pretraining_loss.png", "Pretraining (§3.4): training loss", "nats per token", "loss",
        "training loss",
        (("held-out loss after training", "heldout_loss"), ("unigram cross-entropy", "unigram_entropy")),
    ),
    "rm": _PlotSpec(
        "reward_model_accuracy.png", "Reward model (§4.1.2): pair accuracy",
        "chosen ranked above rejected", "pair_accuracy", "training batches",
        (("held-out before", "heldout_before"), ("held-out after", "heldout_after")),
    ),
    "dpo": _PlotSpec(
        "dpo_margins.png", "DPO (§4.1.4): implicit reward margin",
        "β × (chosen - rejected log-ratio)", "rewards/margins", "training batches",
        (("held-out before", "margin_before"), ("held-out after", "margin_after")),
    ),
}  # fmt: skip
"""The plot each stage gets in the report (files inside ``<out>/plots``)."""


def _plots(out: Path, results: Mapping[str, Mapping[str, Any]]) -> dict[str, Path]:
    plots: dict[str, Path] = {}
    for stage, spec in PLOTS.items():
        if stage not in results:
            continue
        r = results[stage]
        steps, values = read_metrics(out / stage, spec.metric)
        lines = {f"{label} ({_f(r[key])})": r[key] for label, key in spec.lines}
        path = _plot(
            out / "plots" / spec.file,
            spec.title,
            spec.ylabel,
            [(spec.curve_label, steps, values)],
            lines,
        )
        if path is not None:
            plots[stage] = path
    return plots


def write_report(
    out: Path,
    stages: Sequence[tuple[str, str]],
    results: Mapping[str, Mapping[str, Any]],
    seconds: Mapping[str, float],
) -> Path:
    """Write ``out/report.md`` (and ``out/plots/*.png``) for the stages in `results`.

    `stages` lists every stage as (name, section of the paper) in order; `results` holds each
    finished stage's results (its ``line`` is what the demo printed); `seconds` how long each took
    when it ran (a reused stage keeps the time of the run that made it).
    """
    plots = _plots(out, results)
    lines = [
        "# llama-demo report",
        "",
        'The stages of "The Llama 3 Herd of Models" (arXiv 2407.21783) on one CPU, each with the '
        "figure that shows it worked.",
        "",
        "| stage | section | result | seconds |",
        "| --- | --- | --- | ---: |",
    ]
    for name, section in stages:
        if name in results:
            line = str(results[name]["line"]).replace("|", "\\|").replace("\n", " ")
            lines.append(f"| {name} | {section} | {line} | {seconds.get(name, 0.0):.0f} |")
    for name, path in plots.items():
        lines += ["", f"![{name}](plots/{path.name})"]
    if "serve" in results:
        serve = results["serve"]
        lines += [
            "",
            "## The served answer",
            "",
            f"Question: {serve['question']}",
            "",
            f"Answer (streamed from the FP8 model through the `openai` client): {serve['answer']}",
            "",
            f"The function's docstring: {serve['true_answer']}",
        ]
    report = out / "report.md"
    with atomic_write(report) as tmp:
        tmp.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return report
