"""Which policy serves a user: stable, in proportion, and checked when configured."""

from __future__ import annotations

import hashlib

import pytest

from oo_serving.assignment import BUCKETS, Assignment, bucket, parse_split
from oo_serving.core import registry

POLICIES = dict(registry.DEFAULTS)


def test_a_users_bucket_is_the_sha256_of_its_id_and_nothing_else() -> None:
    # Pinned: a change here would move users between arms on upgrade.
    digest = hashlib.sha256(b"user-42").digest()
    assert bucket("user-42") == int.from_bytes(digest[:8], "big") % BUCKETS
    assert bucket("user-42") == bucket("user-42")
    assert bucket("é") == int.from_bytes(hashlib.sha256("é".encode()).digest()[:8], "big") % BUCKETS


def test_a_split_gives_each_arm_its_share_of_users() -> None:
    split = Assignment.split(parse_split("linucb-v1:30,linucb-v2:70"), POLICIES)
    assert split.shares() == {"linucb-v1": 0.3, "linucb-v2": 0.7}
    users = [f"u{i}" for i in range(20_000)]
    share = sum(split.policy_for(u).name == "linucb-v2" for u in users) / len(users)
    assert abs(share - 0.7) < 0.015  # sd of the share is 0.0032


def test_growing_an_arm_moves_only_users_into_it() -> None:
    before = Assignment.split(parse_split("linucb-v1:90,linucb-v2:10"), POLICIES)
    after = Assignment.split(parse_split("linucb-v1:50,linucb-v2:50"), POLICIES)
    users = [f"u{i}" for i in range(5_000)]
    moved = [u for u in users if before.policy_for(u).name != after.policy_for(u).name]
    assert moved
    assert all(after.policy_for(u).name == "linucb-v2" for u in moved)


def test_one_policy_serves_everyone() -> None:
    single = Assignment.single(POLICIES["linucb-v2"])
    assert {single.policy_for(f"u{i}").name for i in range(100)} == {"linucb-v2"}
    zero = Assignment.split(parse_split("linucb-v1:0,linucb-v2:1"), POLICIES)
    assert {zero.policy_for(f"u{i}").name for i in range(100)} == {"linucb-v2"}


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("linucb-v1", "NAME:WEIGHT"),
        ("linucb-v1:-1", "NAME:WEIGHT"),
        ("linucb-v1:0.5", "NAME:WEIGHT"),
        ("linucb-v1:50,", "NAME:WEIGHT"),
        ("nope:50", "no policy 'nope'"),
        ("linucb-v1:50,linucb-v1:50", "listed twice"),
        ("linucb-v1:0", "must not all be 0"),
    ],
)
def test_a_bad_split_is_refused_with_a_reason(text: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse_split(text)
