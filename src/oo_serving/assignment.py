"""Which policy serves a user: one policy for everyone, or a split by a stable hash.

`OO_POLICY_SPLIT="linucb-v1:50,linucb-v2:50"` puts each user in one arm by the SHA-256 of
its id: the same arm in every process, every replica and every release, whatever the
order of requests; a user keeps its arm while the split stays the same. Changing the
weights moves only the users whose bucket changes arm (buckets are cut in the order the
arms are listed), and a moved user's model is rebuilt under its new policy from its
decision log (service.py), so a move loses no learning.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from oo_serving.core import registry
from oo_serving.core.policy import Policy

BUCKETS = 10_000
"""Users are hashed into this many buckets; arm weights are shares of them."""


def parse_split(text: str) -> list[tuple[str, int]]:
    """ "name:weight,name:weight" as [(name, weight)]; ValueError says what is wrong."""
    arms: list[tuple[str, int]] = []
    for part in text.split(","):
        name, sep, weight = part.strip().partition(":")
        if not sep or not name or not weight.strip().isdigit():
            raise ValueError(
                f"each arm of a policy split is NAME:WEIGHT with a whole-number weight,"
                f" e.g. linucb-v1:50,linucb-v2:50; got {part.strip()!r}"
            )
        if name not in registry.NAMES:
            raise ValueError(f"no policy {name!r}; policies: {', '.join(registry.NAMES)}")
        if any(name == seen for seen, _ in arms):
            raise ValueError(f"policy {name!r} is listed twice in the split")
        arms.append((name, int(weight)))
    if sum(w for _, w in arms) <= 0:
        raise ValueError("the weights of a policy split must not all be 0")
    return arms


def bucket(user_id: str) -> int:
    """The user's bucket in [0, BUCKETS): the first 8 bytes of SHA-256(user_id)."""
    digest = hashlib.sha256(user_id.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") % BUCKETS


@dataclass(frozen=True, slots=True)
class Assignment:
    """The serving policies and how users are split between them.

    arms: (policy, first bucket past its share), in order; the last ends at BUCKETS.
    """

    arms: tuple[tuple[Policy, int], ...]

    @classmethod
    def single(cls, policy: Policy) -> Assignment:
        return cls(((policy, BUCKETS),))

    @classmethod
    def split(
        cls, weights: Sequence[tuple[str, int]], policies: Mapping[str, Policy]
    ) -> Assignment:
        total = sum(w for _, w in weights)
        arms: list[tuple[Policy, int]] = []
        cumulative = 0
        for name, weight in weights:
            cumulative += weight
            arms.append((policies[name], BUCKETS * cumulative // total))
        return cls(tuple(arms))

    @property
    def policies(self) -> tuple[Policy, ...]:
        """Every policy with a share of users."""
        return tuple(p for p, _ in self.arms)

    def policy_for(self, user_id: str) -> Policy:
        if len(self.arms) == 1:
            return self.arms[0][0]
        b = bucket(user_id)
        for policy, end in self.arms:
            if b < end:
                return policy
        return self.arms[-1][0]  # unreachable: the last arm ends at BUCKETS

    def shares(self) -> dict[str, float]:
        """Each policy's share of users, in [0, 1]."""
        shares: dict[str, float] = {}
        start = 0
        for policy, end in self.arms:
            shares[policy.name] = (end - start) / BUCKETS
            start = end
        return shares
