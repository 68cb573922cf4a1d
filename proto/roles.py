"""A machine's role, the one enum for it, and its one conversion to and from the proto.

A role is `prompt`, `token` or `mixed` (DESIGN.md's vocabulary): a machine's home pool is its
configured role, its current role is the pool it serves in now (a machine borrowed into the
mixed pool keeps its home). clsd's pools (cls/pools.py), mlsd's config and service, and the SDK
all use this enum; the proto's `Role` values appear only here.
"""

from __future__ import annotations

import enum

from proto import mlsd_pb2 as pb


class Role(enum.StrEnum):
    PROMPT = "prompt"
    TOKEN = "token"
    MIXED = "mixed"

    def to_pb(self) -> pb.Role.ValueType:
        return _TO_PB[self]

    @classmethod
    def from_pb(cls, value: pb.Role.ValueType) -> Role:
        """Raises ValueError for ROLE_UNSPECIFIED or an unknown value."""
        try:
            return _FROM_PB[value]
        except KeyError:
            raise ValueError(f"no role has the proto value {value}") from None

    @property
    def home(self) -> Role:
        """The home pool of a machine configured with this role: a machine configured `mixed`
        lives in the token pool and is lent to the mixed pool when prompts queue up."""
        return Role.TOKEN if self is Role.MIXED else self


_TO_PB = {Role.PROMPT: pb.PROMPT, Role.TOKEN: pb.TOKEN, Role.MIXED: pb.MIXED}
_FROM_PB = {v: k for k, v in _TO_PB.items()}
