"""Compute-optimal scaling laws from IsoFLOPs curves (§3.2.1 of "The Llama 3 Herd of Models").

The recipe, as the paper describes it:

1. Train models at several compute budgets C (the paper: 6e18 to 1e22 FLOPs). For one budget,
   each run trades model size against training tokens; plotting validation loss against
   log(training tokens) gives an *IsoFLOPs curve*, to which the paper fits a parabola.
   The parabola's minimum is the compute-optimal token count N*(C) (`isoflops_minimum`).
2. Fit a power law N*(C) = A·C^α through the minima (`fit_power_law`); the paper reports
   (α, A) = (0.53, 0.29).
3. Extrapolate to the flagship budget (3.8e25 FLOPs) and convert tokens to parameters with the
   6ND approximation, C ≈ 6·N_params·D_tokens (`compute_optimal`).

A caveat measured by this module's tests: the paper's rounded (α, A) = (0.53, 0.29) at
C = 3.8e25 give ≈ 10.46T tokens (and ≈ 605B parameters by 6ND), not the 16.55T tokens / 402B
parameters the paper quotes. No (α, A) that rounds to (0.53, 0.29) reaches 16.55T (the largest,
(0.535, 0.295), gives ≈ 14.3T), so the paper's extrapolation was made with a fit this module
cannot reconstruct from the published coefficients. The paper's own pair is also only loosely
6ND-consistent: 6 · 402e9 · 16.55e12 ≈ 3.99e25, 5% above 3.8e25.

`scaling_law_table` renders the fitted minima and the law as text; `plot_scaling_law` draws the
IsoFLOPs curves (the paper's Figure 2) and the power law with a budget's prediction (Figure 3)
to a PNG (matplotlib, imported only when plotting).
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt

from llama_model import atomic_write

__all__ = [
    "PAPER_ALPHA",
    "PAPER_A",
    "PAPER_FLAGSHIP_FLOPS",
    "PAPER_FLAGSHIP_TOKENS",
    "PAPER_FLAGSHIP_PARAMS",
    "FLOPS_PER_TOKEN_PER_PARAM",
    "PowerLaw",
    "isoflops_minimum",
    "fit_power_law",
    "compute_optimal",
    "fit_from_runs",
    "scaling_law_table",
    "plot_scaling_law",
]

ArrayLike = npt.ArrayLike

PAPER_ALPHA = 0.53  # §3.2.1: "we find (α, A) = (0.53, 0.29)" — rounded to 2 digits.
PAPER_A = 0.29  # §3.2.1, same sentence.
PAPER_FLAGSHIP_FLOPS = 3.8e25  # §3.2.1: the flagship training budget.
PAPER_FLAGSHIP_TOKENS = 16.55e12  # §3.2.1: "16.55T tokens" (not reproducible from 0.53/0.29).
PAPER_FLAGSHIP_PARAMS = 402e9  # §3.2.1: "a 402B parameter model".
FLOPS_PER_TOKEN_PER_PARAM = 6.0  # The 6ND approximation (Kaplan et al., 2020): 2 fwd + 4 bwd.


@dataclass(frozen=True)
class PowerLaw:
    """N*(C) = A · C^alpha: compute-optimal training tokens as a function of FLOPs."""

    A: float  # coefficient (tokens at C = 1 FLOP)
    alpha: float  # exponent; ~0.5 means tokens and parameters grow together

    def predict(self, compute: ArrayLike) -> npt.NDArray[np.float64]:
        """Compute-optimal tokens for each budget in `compute` (FLOPs, all > 0)."""
        c = _positive_array(compute, "compute")
        return np.asarray(self.A * c**self.alpha, dtype=np.float64)


def _positive_array(values: ArrayLike, name: str) -> npt.NDArray[np.float64]:
    array = np.asarray(values, dtype=np.float64)
    if array.ndim > 1:
        raise ValueError(f"{name} must be a scalar or 1-D array, got shape {array.shape}")
    bad = array[~(np.isfinite(array) & (array > 0))]
    if bad.size:
        raise ValueError(
            f"{name} must be finite and > 0 (they are logged), got {bad.tolist()[:5]}; "
            "drop or fix those entries"
        )
    return array


def isoflops_minimum(
    tokens: ArrayLike, losses: ArrayLike, *, budget: float | None = None
) -> tuple[float, float]:
    """Fit loss = a·(log10 t)² + b·log10 t + c by least squares; return (t*, loss(t*)).

    `budget` is only used to name the IsoFLOPs curve in error messages.
    """
    a, b, c = _isoflops_parabola(tokens, losses, budget=budget)
    x_star = -b / (2 * a)
    loss_star = c - b * b / (4 * a)
    return float(10**x_star), float(loss_star)


def _isoflops_parabola(
    tokens: ArrayLike, losses: ArrayLike, *, budget: float | None = None
) -> tuple[float, float, float]:
    """Validate one IsoFLOPs curve and fit (a, b, c) of loss = a·x² + b·x + c, x = log10 t."""
    where = f" for compute budget {budget:.3g} FLOPs" if budget is not None else ""
    t = _positive_array(tokens, "tokens")
    y = np.asarray(losses, dtype=np.float64)
    if t.shape != y.shape or t.ndim != 1:
        raise ValueError(
            f"tokens and losses must be 1-D and the same length{where}, "
            f"got shapes {t.shape} and {y.shape}"
        )
    if t.size < 3:
        raise ValueError(
            f"a parabola needs at least 3 runs{where}, got {t.size}; add runs at this budget"
        )
    if not np.all(np.isfinite(y)):
        raise ValueError(f"losses must be finite{where}, got {y.tolist()}")
    if np.unique(t).size < 3:
        raise ValueError(
            f"a parabola needs at least 3 distinct token counts{where}, got {np.unique(t).tolist()}"
        )
    a, b, c = np.polyfit(np.log10(t), y, deg=2)
    if a <= 0:
        raise ValueError(
            f"IsoFLOPs fit{where} opens downward or is flat (quadratic coefficient a = {a:.4g} "
            "<= 0), so it has no minimum; the runs probably do not bracket the optimum — "
            "add runs with fewer and more tokens"
        )
    return float(a), float(b), float(c)


def fit_power_law(compute: ArrayLike, optimal_tokens: ArrayLike) -> PowerLaw:
    """Fit log10 N* = log10 A + alpha · log10 C by linear least squares."""
    c = _positive_array(compute, "compute")
    n = _positive_array(optimal_tokens, "optimal_tokens")
    if c.shape != n.shape or c.ndim != 1:
        raise ValueError(
            f"compute and optimal_tokens must be 1-D and the same length, "
            f"got shapes {c.shape} and {n.shape}"
        )
    if np.unique(c).size < 2:
        raise ValueError(
            f"a power law needs at least 2 distinct compute budgets, got {np.unique(c).tolist()}"
        )
    alpha, log_a = np.polyfit(np.log10(c), np.log10(n), deg=1)
    return PowerLaw(A=float(10**log_a), alpha=float(alpha))


def compute_optimal(
    budget_flops: float,
    law: PowerLaw,
    flops_per_token: float = FLOPS_PER_TOKEN_PER_PARAM,
) -> tuple[float, float]:
    """Return (tokens, params) for `budget_flops`: tokens from `law`, params = C / (6·tokens).

    `flops_per_token` is training FLOPs per token per parameter; 6 is the 6ND approximation.
    """
    if not (math.isfinite(budget_flops) and budget_flops > 0):
        raise ValueError(f"budget_flops must be finite and > 0, got {budget_flops}")
    if not (math.isfinite(flops_per_token) and flops_per_token > 0):
        raise ValueError(f"flops_per_token must be finite and > 0, got {flops_per_token}")
    tokens = float(law.predict(budget_flops))
    return tokens, budget_flops / (flops_per_token * tokens)


def fit_from_runs(
    runs: Iterable[tuple[float, float, float]],
) -> tuple[dict[float, tuple[float, float]], PowerLaw]:
    """Group (compute, tokens, loss) runs by budget, fit each IsoFLOPs curve, then the power law.

    Returns ({budget: (t*, loss*)} in increasing budget order, PowerLaw).
    """
    by_budget = _group_runs(runs)
    minima: dict[float, tuple[float, float]] = {}
    for budget, (tokens_at, losses_at) in by_budget.items():
        minima[budget] = isoflops_minimum(tokens_at, losses_at, budget=budget)
    law = fit_power_law(list(minima), [t for t, _ in minima.values()])
    return minima, law


def _group_runs(
    runs: Iterable[tuple[float, float, float]],
) -> dict[float, tuple[list[float], list[float]]]:
    """{budget: (tokens, losses)} in increasing budget order; needs >= 2 budgets."""
    by_budget: dict[float, tuple[list[float], list[float]]] = defaultdict(lambda: ([], []))
    for run in runs:
        if len(run) != 3:
            raise ValueError(f"each run must be (compute, tokens, loss), got {run!r}")
        compute, tokens, loss = (float(v) for v in run)
        if not (math.isfinite(compute) and compute > 0):
            raise ValueError(f"run compute must be finite and > 0, got {compute} in {run!r}")
        by_budget[compute][0].append(tokens)
        by_budget[compute][1].append(loss)
    if len(by_budget) < 2:
        raise ValueError(
            f"need runs at >= 2 compute budgets to fit a power law, got {sorted(by_budget)}"
        )
    return {budget: by_budget[budget] for budget in sorted(by_budget)}


def scaling_law_table(
    minima: dict[float, tuple[float, float]],
    law: PowerLaw,
    extrapolate_to: Iterable[float] = (PAPER_FLAGSHIP_FLOPS,),
) -> str:
    """Render per-budget minima, the law's prediction, and extrapolations as a text table."""
    lines = [
        f"N*(C) = {law.A:.4g} * C^{law.alpha:.4f}",
        f"{'compute (FLOPs)':>16} {'t* fitted':>12} {'t* law':>12} {'loss*':>8} {'params (6ND)':>13}",
    ]
    for budget, (tokens, loss) in sorted(minima.items()):
        predicted = float(law.predict(budget))
        params = budget / (FLOPS_PER_TOKEN_PER_PARAM * tokens)
        lines.append(
            f"{budget:>16.3e} {tokens:>12.4e} {predicted:>12.4e} {loss:>8.4f} {params:>13.4e}"
        )
    for budget in extrapolate_to:
        tokens, params = compute_optimal(budget, law)
        lines.append(
            f"{budget:>16.3e} {'-':>12} {tokens:>12.4e} {'-':>8} {params:>13.4e}  (extrapolated)"
        )
    return "\n".join(lines)


def plot_scaling_law(
    runs: Iterable[tuple[float, float, float]],
    png: Path,
    *,
    budget: float | None = PAPER_FLAGSHIP_FLOPS,
    flops_per_token: float = FLOPS_PER_TOKEN_PER_PARAM,
) -> Path:
    """Draw the scaling-law fit of (compute, tokens, loss) `runs` to `png`; return `png`.

    Left panel (the paper's Figure 2): validation loss against training tokens for each compute
    budget, the fitted parabola in log10(tokens) and its minimum. Right panel (Figure 3): the
    minima N*(C) against compute, the fitted power law N*(C) = A·C^α and, when `budget` is given,
    the law's prediction there, labelled with tokens and parameters (C / (flops_per_token·N*)).
    Fits exactly as `fit_from_runs` does, with the same errors. The PNG is written to a temporary
    name and renamed (`llama_model.atomic_write`), so an existing plot is replaced only by a complete
    one.
    """
    # Imported here: the fits need only numpy. The Agg canvas is used directly (no pyplot, no
    # global backend, no display).
    from matplotlib import colormaps
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import NullFormatter

    by_budget = _group_runs(runs)
    parabolas = {c: _isoflops_parabola(t, y, budget=c) for c, (t, y) in by_budget.items()}
    minima, law = fit_from_runs(
        (c, t, y) for c, (ts, ys) in by_budget.items() for t, y in zip(ts, ys, strict=True)
    )
    prediction = compute_optimal(budget, law, flops_per_token) if budget is not None else None

    figure = Figure(figsize=(12, 5), dpi=100)
    FigureCanvasAgg(figure)
    curves, law_axes = figure.subplots(1, 2)
    log_budgets = np.log10(list(by_budget))
    span = float(np.ptp(log_budgets)) or 1.0
    colormap = colormaps["viridis"]
    for (compute, (tokens, losses)), log_c in zip(by_budget.items(), log_budgets, strict=True):
        color = colormap(0.9 * (log_c - log_budgets.min()) / span)
        a, b, c = parabolas[compute]
        x = np.linspace(np.log10(min(tokens)) - 0.1, np.log10(max(tokens)) + 0.1, 200)
        curves.scatter(tokens, losses, color=color, s=14)
        curves.plot(10**x, a * x**2 + b * x + c, color=color, label=f"{compute:.0e} FLOPs")
        t_star, loss_star = minima[compute]
        curves.scatter([t_star], [loss_star], color=color, marker="*", s=140, edgecolor="black")
    curves.set_xscale("log")
    curves.xaxis.set_minor_formatter(NullFormatter())  # labelled minor ticks overlap in a decade
    curves.set_xlabel("training tokens")
    curves.set_ylabel("validation loss")
    curves.set_title("IsoFLOPs curves and fitted minima (★)")
    curves.grid(alpha=0.3, which="both")
    curves.legend(fontsize=8)

    budgets = np.array(list(minima))
    minimum_tokens = [t for t, _ in minima.values()]
    law_axes.scatter(budgets, minimum_tokens, color="tab:blue", zorder=3, label="IsoFLOPs minima")
    high = max(budgets.max(), budget if budget is not None else 0.0)
    line = np.geomspace(budgets.min(), high, 200)
    law_label = f"N*(C) = {law.A:.3g}·C^{law.alpha:.3f}"
    law_axes.plot(line, law.predict(line), color="tab:orange", label=law_label)
    if prediction is not None and budget is not None:
        predicted_tokens, params = prediction
        label = f"{budget:.2e} FLOPs: {predicted_tokens:.3g} tokens, {params:.3g} params"
        law_axes.scatter(
            [budget], [predicted_tokens], color="tab:red", marker="*", s=160, zorder=4, label=label
        )
        law_axes.axvline(budget, color="tab:red", linestyle=":", alpha=0.6)
    law_axes.set_xscale("log")
    law_axes.set_yscale("log")
    law_axes.set_xlabel("compute (FLOPs)")
    law_axes.set_ylabel("compute-optimal training tokens N*(C)")
    law_axes.set_title("Compute-optimal tokens: power-law fit")
    law_axes.grid(alpha=0.3, which="both")
    law_axes.legend(fontsize=8)
    figure.tight_layout()

    png = Path(png)
    with atomic_write(png) as tmp:
        figure.savefig(tmp, format="png")
    return png
