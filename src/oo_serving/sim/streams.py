"""Common random numbers: one independent generator per (seed, stream, user, round, salt).

Every random thing in a simulated run is drawn from its own generator, built from a key
rather than taken from a generator shared along the run:

| stream     | key                               | draws                                   |
|------------|-----------------------------------|-----------------------------------------|
| `USER`     | (seed, USER, user, 0, 0)          | the user's hidden parameters            |
| `ROUND`    | (seed, ROUND, user, round, 0)     | the round's hour, day and candidates    |
| `RESPONSE` | (seed, RESPONSE, user, round, 0)  | ignored or not; the response to the tip |
| `POLICY`   | (seed, POLICY, user, round, salt) | a random policy's own draws, salt: name |
| `ARRIVAL`  | (seed, ARRIVAL, 0, 0, 0)          | the order of arrivals, when shuffled    |

So two policies run on one seed see the same users, the same tasks at the same hours,
and, when they show the same task, the same response; and no draw depends on the order
users are processed in, on how many draws an earlier round made, or on what a policy chose.

Every key has the same length, KEY_LENGTH words, each in [0, 2³²): numpy's `SeedSequence`
pads entropy with zeros, so `[1, 2]` and `[1, 2, 0]` seed the same generator, and an int
of 2³² or more takes two words. Fixed-length keys of 32-bit words are distinct entropy.
"""

from __future__ import annotations

import zlib
from enum import IntEnum

import numpy as np

KEY_LENGTH = 5
MAX_WORD = 2**32 - 1


class Stream(IntEnum):
    USER = 0
    ROUND = 1
    RESPONSE = 2
    POLICY = 3
    ARRIVAL = 4


def check_seed(seed: int) -> int:
    """`seed` if it is an int in [0, 2³²); ValueError otherwise."""
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed <= MAX_WORD:
        raise ValueError(f"a seed must be an int in [0, 2**32), got {seed!r}")
    return seed


def generator(
    seed: int, stream: Stream, user: int = 0, round_: int = 0, salt: int = 0
) -> np.random.Generator:
    """The generator of key (seed, stream, user, round_, salt); the same key, the same draws."""
    key = (seed, int(stream), user, round_, salt)
    for word in key:
        if not 0 <= word <= MAX_WORD:
            raise ValueError(f"every key word must be in [0, 2**32), got key {key!r}")
    # What np.random.default_rng(key) builds, from the same five words, at half the cost:
    # a simulated round builds two generators, and this was a third of its time.
    words = np.array(key, dtype=np.uint32)
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence(words)))


def salt(name: str) -> int:
    """A stable 32-bit salt for a policy's stream: CRC-32 of its name (not Python's hash)."""
    return zlib.crc32(name.encode("utf-8"))
