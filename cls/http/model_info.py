"""What the door knows of the model, from the machines registered now (clsd reads no model config).

- `max_model_len`: the longest context a serving machine offers (`/v1/models`, `/tokenize`).
- `context_room`: the longest prompt + output one serving machine can hold, context and KV
  memory both (the router's `fits_anywhere` test); the default max_tokens is this minus the
  prompt, as vLLM's "the rest of the context" (a token machine reserves prompt + max_tokens of
  KV, so the KV memory bounds it too).
None when no machine serves.
"""

from __future__ import annotations

from cls.service import ClusterState


def max_model_len(state: ClusterState) -> int | None:
    return max((m.max_model_len for m in state.pools.machines.values() if not m.draining), default=None)


def context_room(state: ClusterState) -> int | None:
    return max((min(m.max_model_len, m.kv_blocks_total * m.block_size)
                for m in state.pools.machines.values() if not m.draining), default=None)


def model_card(name: str, created: int, state: ClusterState) -> dict:
    card = {"id": name, "object": "model", "created": created, "owned_by": "splitserve", "root": name,
            "parent": None}
    if (length := max_model_len(state)) is not None:
        card["max_model_len"] = length
    return card
