"""What clsctl's commands print: errors, JSON, aligned tables, a streamed answer and its timing
line. Shared by the command modules (clsctl.py, local_up.py), which import nothing from each
other but this."""

from __future__ import annotations

import json
import sys

from cls.client import ClsClient, Completion, MachineStatus


def error(msg: str) -> int:
    """Prints `error: <msg>` on stderr; returns exit code 1."""
    print(f"error: {msg}", file=sys.stderr)
    return 1


def print_json(obj) -> None:
    print(json.dumps(obj, indent=2))


def table(headers: list[str], rows: list[list]) -> str:
    """Aligned columns; numbers right-aligned."""
    cells = [[str(c) for c in r] for r in rows]
    widths = [max([len(h)] + [len(r[i]) for r in cells]) for i, h in enumerate(headers)]
    numeric = [bool(rows) and all(isinstance(r[i], (int, float)) and not isinstance(r[i], bool)
                                  for r in rows) for i in range(len(headers))]

    def line(values: list[str]) -> str:
        return "  ".join(v.rjust(w) if num else v.ljust(w)
                         for v, w, num in zip(values, widths, numeric)).rstrip()

    return "\n".join([line(headers)] + [line(r) for r in cells])


def machines_table(machines: list[MachineStatus]) -> str:
    rows = [[m.machine_id, m.address, m.home, m.role, "yes" if m.draining else "no",
             m.pending_prompt_tokens, m.pending_decode_tokens,
             f"{m.kv_blocks_free}/{m.kv_blocks_total}", m.num_requests,
             f"{m.lease_expires_in_s:.1f}"] for m in machines]
    return table(["MACHINE", "ADDRESS", "HOME", "ROLE", "DRAINING", "PENDING_PROMPT",
                  "PENDING_DECODE", "KV_FREE", "REQUESTS", "LEASE_S"], rows)


def timing_line(c: Completion) -> str:
    t = c.timing
    where = c.prompt_machine if c.prompt_machine == c.token_machine else \
        f"{c.prompt_machine} -> {c.token_machine}"
    reroutes = f", {c.num_reroutes} reroutes" if c.num_reroutes else ""
    return (f"[{c.request_id}] {len(c.token_ids)} tokens ({c.num_prompt_tokens} prompt), "
            f"{c.finish_reason}; ttft {t.ttft_s:.3f} s, tpot {t.tpot_s * 1e3:.1f} ms, "
            f"max tbt {t.max_tbt_s * 1e3:.1f} ms, e2e {t.e2e_s:.3f} s, queue {t.queue_s:.3f} s; "
            f"{where}{reroutes}")


def stream_answer(client: ClsClient, prompt: str, **sampling) -> Completion:
    """Writes the text to stdout as it arrives; returns the completion."""
    with client.generate_stream(prompt, **sampling) as stream:
        for delta in stream:
            sys.stdout.write(delta.text)
            sys.stdout.flush()
        done = stream.completion()
    print()
    return done
