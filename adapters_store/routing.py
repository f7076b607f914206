"""Which adapter version serves a request when a task's traffic is split between versions.

Pure logic, no I/O. A request with a routing key (the OpenAI `user` field, or the X-PrAd-Routing-Key
header) goes where weighted rendezvous hashing sends it: every version scores the key with
`weight / -ln(u)`, `u` a uniform hash of (key, version), and the highest score wins. Each version
then gets exactly its weight's share of keys, every node agrees without talking to the others, and
the assignment is monotone: raising one version's weight only moves keys *to* it (a ramp from 10 %
to 20 % moves the new 10 % and nothing else), and a version that leaves the split takes only its own
keys with it. Requests without a key are split at random by weight.
"""

from __future__ import annotations

import hashlib
import math
import random
from collections.abc import Collection, Sequence

MAX_ROUTING_KEY_CHARS = 256


def key_score(key: str, version: str, weight: int) -> float:
    """The rendezvous score of `version` for `key`: weight / -ln(u), u uniform in (0, 1)."""
    if weight <= 0:
        return 0.0
    digest = hashlib.blake2b(f"{key}\0{version}".encode(), digest_size=8).digest()
    u = (int.from_bytes(digest, "big") + 0.5) / 2.0**64  # never 0 or 1
    return weight / -math.log(u)


def choose_version(weights: Sequence[tuple[str, int]], key: str | None, rng: random.Random,
                   exclude: Collection[str] = ()) -> str | None:
    """The version a request goes to, among those with weight > 0 and not in `exclude` (versions this
    node cannot load); None when none is left. Sticky for a key while the weights stand."""
    candidates = [(v, w) for v, w in weights if w > 0 and v not in exclude]
    if not candidates:
        return None
    if key is None:
        return rng.choices([v for v, _ in candidates], [w for _, w in candidates])[0]
    return max(candidates, key=lambda vw: (key_score(key, vw[0], vw[1]), vw[0]))[0]
