"""Seeds of the run's random streams, from one rule.

Every stream (a rank's dropout, a sample's crop, an epoch's shard order, a step's corruption
noise) is seeded by :func:`derive` from the run's ``seed``, a name saying what the stream is for,
and where it is (rank, epoch, step, index). Equal arguments give the same seed, so a resumed run
draws what an uninterrupted one would; different names or places give unrelated streams (no
``seed * 1000 + rank`` collisions between purposes).
"""

from __future__ import annotations

import hashlib


def derive(seed: int, purpose: str, *where: int) -> int:
    """A 63-bit seed for the stream ``purpose`` at position ``where`` of a run seeded ``seed``
    (fits torch.manual_seed, numpy and random)."""
    text = "/".join([str(int(seed)), purpose, *(str(int(w)) for w in where)])
    digest = hashlib.blake2b(text.encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


__all__ = ["derive"]
