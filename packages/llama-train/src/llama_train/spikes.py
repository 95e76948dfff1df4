"""Loss-spike detection (§3.3.4 reliability; the paper's runs recovered from spikes by skipping
updates and, when spikes repeated, restarting from an earlier checkpoint).

A step's loss is a spike when it is not finite, or when it exceeds the mean of the last `window`
accepted losses by more than `zscore` standard deviations *and* by more than `min_ratio` of that
mean (the second guard keeps a very flat loss curve, whose standard deviation is tiny, from turning
ordinary noise into spikes). Nothing is judged before `min_history` losses were accepted.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Mapping
from typing import Any, Literal

__all__ = ["SpikeDetector", "Verdict"]

Verdict = Literal["ok", "skip", "rollback"]


class SpikeDetector:
    """Judges each step's loss; its state is JSON-serialisable for checkpoints."""

    def __init__(
        self,
        *,
        window: int = 50,
        min_history: int = 10,
        zscore: float = 6.0,
        min_ratio: float = 0.1,
        max_consecutive: int = 3,
    ) -> None:
        if window < 1 or min_history < 1 or max_consecutive < 1:
            raise ValueError(
                f"window ({window}), min_history ({min_history}) and max_consecutive "
                f"({max_consecutive}) must be >= 1"
            )
        if min_history > window:
            raise ValueError(f"min_history ({min_history}) cannot exceed window ({window})")
        self.window, self.min_history = window, min_history
        self.zscore, self.min_ratio, self.max_consecutive = zscore, min_ratio, max_consecutive
        self.history: deque[float] = deque(maxlen=window)
        self.consecutive = 0
        self.regime: str | None = None  # what the history was measured on (data mix, length)

    def threshold(self) -> float | None:
        """Losses above this are spikes (None while the history is too short)."""
        if len(self.history) < self.min_history:
            return None
        mean = sum(self.history) / len(self.history)
        std = math.sqrt(sum((x - mean) ** 2 for x in self.history) / len(self.history))
        return mean + max(self.zscore * std, self.min_ratio * abs(mean))

    def judge(self, loss: float) -> Verdict:
        """ "ok" (accept and record), "skip" (drop this update) or "rollback" (too many in a row)."""
        limit = self.threshold()
        if math.isfinite(loss) and (limit is None or loss <= limit):
            self.history.append(loss)
            self.consecutive = 0
            return "ok"
        self.consecutive += 1
        if self.consecutive >= self.max_consecutive:
            self.consecutive = 0
            return "rollback"
        return "skip"

    def reset(self) -> None:
        """Forget the history (the loss level moves on purpose: a new data mix or length)."""
        self.history.clear()
        self.consecutive = 0

    def state_dict(self) -> dict[str, Any]:
        return {
            "history": list(self.history),
            "consecutive": self.consecutive,
            "regime": self.regime,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.history = deque((float(x) for x in state["history"]), maxlen=self.window)
        self.consecutive = int(state["consecutive"])
        self.regime = state.get("regime")
