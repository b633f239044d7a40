"""Exploration on top of any policy, with the exact probability of every candidate.

A policy alone is deterministic: given a user's state it always shows its best
candidate, so the decision log says nothing about what the other candidates would have
earned, and no other policy can be evaluated on it. `epsilon:ε` shows, with probability
ε, a candidate drawn uniformly instead (the policy's own choice included), so that

    P(candidate i) = ε / n + (1 − ε) · [i = greedy]

for every decision, exactly; that vector is what the log keeps (`candidate_p`), and
`oo-serving evaluate` divides by it.

The draw is a function of the event id alone: the first 16 bytes of
SHA-256("oo-serving exploration" ‖ event_id) give two uniform numbers, one for "explore
or not" and one for which candidate. Anyone with the log can recompute and audit every
draw, and a replay decides the same way. The event id is made by the server from the
operating system's random bits and only returned with the answer, so a client cannot
predict or steer the draw, and it is independent of the candidates and of the model.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass

import numpy as np

from oo_serving.core.features import Vector

_DOMAIN = b"oo-serving exploration\x00"
_SCALE = 2.0**-64


@dataclass(frozen=True, slots=True)
class Exploration:
    """epsilon: the probability of showing a uniformly drawn candidate, in [0, 1)."""

    epsilon: float = 0.0

    def __post_init__(self) -> None:
        if not (math.isfinite(self.epsilon) and 0.0 <= self.epsilon < 1.0):
            raise ValueError(f"epsilon must be in [0, 1), got {self.epsilon!r}")

    @property
    def spec(self) -> str:
        """The setting's text: "none" or "epsilon:<ε>"."""
        return "none" if self.epsilon == 0.0 else f"epsilon:{self.epsilon:g}"

    def probabilities(self, n: int, greedy: int) -> Vector:
        """P(each of n candidates is shown) when the policy prefers `greedy`; sums to 1."""
        p: Vector = np.full(n, self.epsilon / n)
        p[greedy] += 1.0 - self.epsilon
        return p

    def choose(self, event_id: str, n: int, greedy: int) -> int:
        """The candidate shown for the decision `event_id`: `greedy`, or with probability
        ε one drawn uniformly from the n."""
        if self.epsilon == 0.0:
            return greedy
        digest = hashlib.sha256(_DOMAIN + event_id.encode()).digest()
        explore = int.from_bytes(digest[:8], "big") * _SCALE
        if explore >= self.epsilon:
            return greedy
        return min(int(int.from_bytes(digest[8:16], "big") * _SCALE * n), n - 1)


NONE = Exploration()


def parse(text: str) -> Exploration:
    """`none` or `epsilon:<ε>` (0 ≤ ε < 1); ValueError says what is accepted."""
    value = text.strip().lower()
    if value in ("", "none"):
        return NONE
    kind, _, arg = value.partition(":")
    if kind != "epsilon" or not arg:
        raise ValueError(f"exploration must be 'none' or 'epsilon:<0..1>', got {text!r}")
    try:
        epsilon = float(arg)
    except ValueError:
        raise ValueError(f"epsilon must be a number, got {arg!r}") from None
    return Exploration(epsilon)
