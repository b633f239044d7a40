"""The stored states of a user's shadow policies (OO_SHADOW_POLICIES).

A shadow policy chooses on every /score without affecting the answer, and learns from
every reward, so its choices can be compared with the serving policy's on live traffic
and its value estimated from the log (`oo-serving evaluate`). Each keeps its own state
per user, stored with the user's model row as one value:

    b"OOS1" | count: u16 | count × (name length: u8 | name | state_version: u32 |
                                     state length: u32 | state)

(integers big-endian; `state` is the policy's own encoding, Policy.encode).
"""

from __future__ import annotations

import struct
from collections.abc import Mapping

_MAGIC = b"OOS1"
_ENTRY = struct.Struct(">II")

States = Mapping[str, tuple[int, bytes]]
"""Shadow policy name → (state_version, encoded state)."""


def encode(states: States) -> bytes | None:
    """The stored value of `states` (None for none)."""
    if not states:
        return None
    parts = [_MAGIC, struct.pack(">H", len(states))]
    for name, (version, state) in sorted(states.items()):
        raw_name = name.encode()
        if len(raw_name) > 255:
            raise ValueError(f"a policy name is at most 255 bytes: {name!r}")
        parts += [bytes([len(raw_name)]), raw_name, _ENTRY.pack(version, len(state)), state]
    return b"".join(parts)


def decode(raw: bytes | None) -> dict[str, tuple[int, bytes]]:
    """The states stored as `raw`; ValueError if it is not such a value."""
    if raw is None:
        return {}
    if raw[:4] != _MAGIC or len(raw) < 6:
        raise ValueError("not a shadow-states value")
    (count,) = struct.unpack_from(">H", raw, 4)
    offset = 6
    states: dict[str, tuple[int, bytes]] = {}
    try:
        for _ in range(count):
            size = raw[offset]
            name = raw[offset + 1 : offset + 1 + size].decode()
            offset += 1 + size
            version, length = _ENTRY.unpack_from(raw, offset)
            offset += _ENTRY.size
            state = raw[offset : offset + length]
            if len(state) != length:
                raise ValueError("a shadow state is cut short")
            offset += length
            states[name] = (version, bytes(state))
    except (IndexError, struct.error, UnicodeDecodeError) as exc:
        raise ValueError(f"a damaged shadow-states value: {exc}") from None
    if offset != len(raw):
        raise ValueError("trailing bytes after the shadow states")
    return states
