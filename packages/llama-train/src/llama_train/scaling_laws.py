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

`scaling_law_table` renders the fitted minima and the law as text (no plotting dependency).
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

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
    x = np.log10(t)
    a, b, c = np.polyfit(x, y, deg=2)
    if a <= 0:
        raise ValueError(
            f"IsoFLOPs fit{where} opens downward or is flat (quadratic coefficient a = {a:.4g} "
            "<= 0), so it has no minimum; the runs probably do not bracket the optimum — "
            "add runs with fewer and more tokens"
        )
    x_star = -b / (2 * a)
    loss_star = c - b * b / (4 * a)
    return float(10**x_star), float(loss_star)


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
    by_budget: dict[float, list[tuple[float, float]]] = defaultdict(list)
    for run in runs:
        if len(run) != 3:
            raise ValueError(f"each run must be (compute, tokens, loss), got {run!r}")
        compute, tokens, loss = (float(v) for v in run)
        if not (math.isfinite(compute) and compute > 0):
            raise ValueError(f"run compute must be finite and > 0, got {compute} in {run!r}")
        by_budget[compute].append((tokens, loss))
    if len(by_budget) < 2:
        raise ValueError(
            f"need runs at >= 2 compute budgets to fit a power law, got {sorted(by_budget)}"
        )
    minima: dict[float, tuple[float, float]] = {}
    for budget in sorted(by_budget):
        tokens_at, losses_at = zip(*by_budget[budget], strict=True)
        minima[budget] = isoflops_minimum(tokens_at, losses_at, budget=budget)
    law = fit_power_law(list(minima), [t for t, _ in minima.values()])
    return minima, law


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
