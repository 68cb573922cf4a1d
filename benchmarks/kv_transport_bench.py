"""Raw KV transport throughput: two real processes on loopback, compared with a same-run memcpy.

What it measures, per transport (`tcp`, `ucx`, `shm`; `local` in one process, as a reference):
1. throughput: a receiver process (this script, `--role receiver`) expects one request at a time
   into an engine-like sink (a [layers, slots, 2, kv_heads, head_dim] cache cut into 16-token
   blocks, in shuffled block order, warmed); this process opens the transfer, queues all 30
   layers and finish(), and times open -> handle DONE (the receiver acks only after the last
   byte is in the sink; for shm the sink's cache is a /dev/shm segment, as a token machine's is,
   with the engine sink's `layer_spans` fast path). Prompts of 128..4096 tokens, demo model
   shape (3 KV heads, head dim 64, bfloat16: 768 bytes per token per layer). GB/s = bytes /
   time; median and best of the repeats after one warm-up transfer per size.
2. memcpy: a warmed torch copy of the same number of bytes in this process (all threads), taken
   right after each row's transfers (same run, same load), and a one-thread memmove (a
   transport's copy runs on one thread); the ratios are the figures to compare across
   machines. Below 32 MiB both copies run from the L3 cache, which the transports, crossing
   processes, mostly cannot.
3. idle CPU (% of one core, psutil, over --idle-s): the receiver process holding a receiver with
   nothing to do; the same while one transfer is open and waiting for its next layer; this
   (sender) process holding a sender.

Waits while another benchmark runs (`pgrep -f engine_bench`): the machine has 2 cores. From the
repo root:

    .venv/bin/python benchmarks/kv_transport_bench.py [--quick] [--transports tcp,ucx,shm,local]
        [--tokens 128,512,1024,2048,4096] [--repeats 5] [--idle-s 3] [--json PATH]
"""

from __future__ import annotations

import argparse
import ctypes
import datetime
import json
import math
import os
import platform
import random
import statistics
import subprocess
import sys
import time
from pathlib import Path

import psutil
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from mls.kv.base import KVSpec, TransferState  # noqa: E402
from mls.kv.factory import make_receiver, make_sender  # noqa: E402

NUM_LAYERS, NUM_KV_HEADS, HEAD_DIM, DTYPE = 30, 3, 64, "bfloat16"
BLOCK_TOKENS = 16
DEADLINE_S = 60.0
SINKS = {"blocks": BLOCK_TOKENS, "contiguous": None}  # sink layout -> tokens per buffer


class BlockSink:
    """Engine-like sink: each layer lands in shuffled 16-token blocks of one big cache tensor
    (the worst case: no two blocks adjacent), or, with block_tokens=None, in one buffer."""

    def __init__(self, max_tokens: int, block_tokens: int | None = BLOCK_TOKENS, seed: int = 0,
                 shared: bool = False):
        self.block_tokens = block_tokens or max_tokens
        num_blocks = -(-max_tokens // self.block_tokens)
        shape = (NUM_LAYERS, num_blocks * self.block_tokens, 2, NUM_KV_HEADS, HEAD_DIM)
        if shared:  # the shm transport writes into it from the sender process
            from engine.shared_memory import SharedSegment

            self.segment = SharedSegment(math.prod(shape) * getattr(torch, DTYPE).itemsize)
            self.cache = self.segment.tensor(shape, getattr(torch, DTYPE))
        else:
            self.cache = torch.empty(shape, dtype=getattr(torch, DTYPE))
        self.cache.fill_(1)  # pages touched before timing
        self.blocks = random.Random(seed).sample(range(num_blocks), num_blocks)
        self.num_tokens = max_tokens

    def use(self, num_tokens: int) -> BlockSink:
        self.num_tokens = num_tokens
        return self

    def layer_buffers(self, layer: int) -> list[torch.Tensor]:
        n, bs, cache = self.num_tokens, self.block_tokens, self.cache[layer]
        return [cache[b * bs: b * bs + min(bs, n - i * bs)] for i, b in enumerate(self.blocks[: -(-n // bs)])]

    def layer_spans(self, layer: int) -> list[tuple[int, int]]:
        """Raw (address, nbytes) of layer_buffers' memory, like EngineSink.layer_spans."""
        n, bs, cache = self.num_tokens, self.block_tokens, self.cache[layer]
        base, token_bytes = cache.data_ptr(), cache.stride(0) * cache.element_size()
        return [(base + b * bs * token_bytes, min(bs, n - i * bs) * token_bytes)
                for i, b in enumerate(self.blocks[: -(-n // bs)])]

    def span_pattern(self) -> tuple[list[tuple[int, int]], list[int]]:
        """Like EngineSink.span_pattern: layer 0's spans and each layer's shift from them."""
        stride = self.cache.stride(0) * self.cache.element_size()
        return self.layer_spans(0), [i * stride for i in range(NUM_LAYERS)]

    def layer_received(self, layer: int) -> None:
        pass


def spec_for(request_id: str, num_tokens: int) -> KVSpec:
    return KVSpec(request_id, NUM_LAYERS, num_tokens, NUM_KV_HEADS, HEAD_DIM, DTYPE)


def cpu_percent(seconds: float) -> float:
    p = psutil.Process()
    t0, c0 = time.monotonic(), p.cpu_times()
    time.sleep(seconds)
    t1, c1 = time.monotonic(), p.cpu_times()
    return 100.0 * (c1.user + c1.system - c0.user - c0.system) / (t1 - t0)


# -- receiver process ------------------------------------------------------------------------


def receiver_main(transport: str, max_tokens: int, block_tokens: int | None) -> None:
    receiver = make_receiver(transport)
    sink = BlockSink(max_tokens, block_tokens, shared=transport == "shm")
    print(json.dumps({"address": receiver.address().hex()}), flush=True)
    for line in sys.stdin:
        cmd = json.loads(line)
        if cmd["op"] == "expect":
            spec = spec_for(cmd["request_id"], cmd["num_tokens"])
            receiver.expect(spec, sink.use(cmd["num_tokens"]), time.monotonic() + DEADLINE_S)
            reply = {"ok": True}
        elif cmd["op"] == "status":
            status = receiver.poll(cmd["request_id"])
            receiver.cancel(cmd["request_id"])
            reply = {"state": status.state.name, "error": status.error}
        elif cmd["op"] == "idle":
            reply = {"cpu_percent": cpu_percent(cmd["seconds"])}
        else:
            break
        print(json.dumps(reply), flush=True)
    receiver.close()


class ReceiverProcess:
    def __init__(self, transport: str, max_tokens: int, sink: str):
        self.proc = subprocess.Popen(
            [sys.executable, __file__, "--role", "receiver", "--transports", transport, "--sinks", sink,
             "--tokens", str(max_tokens)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=REPO)
        self.address = bytes.fromhex(self._read()["address"])

    def call(self, **cmd) -> dict:
        self.proc.stdin.write(json.dumps(cmd) + "\n")
        self.proc.stdin.flush()
        return self._read()

    def _read(self) -> dict:
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"receiver process exited with {self.proc.wait()}")
        return json.loads(line)

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(timeout=10)


class LocalPeer:
    """The `local` transport's receiver, in this process, behind ReceiverProcess's calls."""

    def __init__(self, max_tokens: int, sink: str):
        self.receiver = make_receiver("local")
        self.sink = BlockSink(max_tokens, SINKS[sink])
        self.address = self.receiver.address()

    def call(self, op: str, request_id: str, num_tokens: int = 0) -> dict:
        if op == "expect":
            spec = spec_for(request_id, num_tokens)
            self.receiver.expect(spec, self.sink.use(num_tokens), time.monotonic() + DEADLINE_S)
            return {"ok": True}
        status = self.receiver.poll(request_id)
        self.receiver.cancel(request_id)
        return {"state": status.state.name, "error": status.error}

    def close(self) -> None:
        self.receiver.close()


# -- sender side (this process) --------------------------------------------------------------


def one_transfer(sender, address: bytes, spec: KVSpec, layers: list[torch.Tensor]) -> float:
    t0 = time.perf_counter()
    handle = sender.open(address, spec, time.monotonic() + DEADLINE_S)
    for i, kv in enumerate(layers):
        handle.send_layer(i, kv)
    handle.finish(1)
    state = handle.wait(DEADLINE_S)
    elapsed = time.perf_counter() - t0
    if state != TransferState.DONE:
        raise RuntimeError(f"transfer {spec.request_id} ended {state.name}: {handle.error}")
    return elapsed


def memcpy_gbps(nbytes: int, repeats: int) -> tuple[float, float]:
    """(torch copy on all threads, one-thread memmove) of nbytes, warmed, median GB/s."""
    src, dst = torch.ones(nbytes, dtype=torch.uint8), torch.zeros(nbytes, dtype=torch.uint8)
    copies = (lambda: dst.copy_(src), lambda: ctypes.memmove(dst.data_ptr(), src.data_ptr(), nbytes))
    out = []
    for copy in copies:
        copy()
        times = []
        for _ in range(max(repeats, 5)):
            t0 = time.perf_counter()
            copy()
            times.append(time.perf_counter() - t0)
        out.append(nbytes / statistics.median(times) / 1e9)
    return out[0], out[1]


def bench_transport(transport: str, sink: str, tokens: list[int], repeats: int,
                    idle_s: float | None) -> dict:
    layers_max = [torch.randn(max(tokens), 2, NUM_KV_HEADS, HEAD_DIM).to(getattr(torch, DTYPE))
                  for _ in range(NUM_LAYERS)]
    sender = make_sender(transport)
    peer = (LocalPeer(max(tokens), sink) if transport == "local"
            else ReceiverProcess(transport, max(tokens), sink))
    rows, seq = [], 0
    for n in tokens:
        layers = [kv[:n].contiguous() for kv in layers_max]
        times = []
        for rep in range(repeats + 1):
            seq += 1
            spec = spec_for(f"{transport}-{n}-{seq}", n)
            peer.call(op="expect", request_id=spec.request_id, num_tokens=n)
            elapsed = one_transfer(sender, peer.address, spec, layers)
            reply = peer.call(op="status", request_id=spec.request_id)
            assert reply["state"] == "DONE", reply
            if rep:  # the first one per size is a warm-up
                times.append(elapsed)
        nbytes = spec.total_nbytes
        # The peer copy right after this size's transfers: on a shared host the load changes
        # within a run, and a ratio is only fair between figures taken under the same load.
        copy = memcpy_gbps(nbytes, repeats)
        rows.append({"tokens": n, "bytes": nbytes, "gbps_median": nbytes / statistics.median(times) / 1e9,
                     "gbps_best": nbytes / min(times) / 1e9, "memcpy_gbps": copy[0],
                     "memmove_1thread_gbps": copy[1]})
    idle = {}
    if idle_s and transport != "local":
        idle["receiver_idle_cpu_percent"] = peer.call(op="idle", seconds=idle_s)["cpu_percent"]
        spec = spec_for(f"{transport}-pending", 128)
        peer.call(op="expect", request_id=spec.request_id, num_tokens=128)
        handle = sender.open(peer.address, spec, time.monotonic() + DEADLINE_S)
        handle.send_layer(0, layers_max[0][:128].contiguous())
        idle["receiver_pending_cpu_percent"] = peer.call(op="idle", seconds=idle_s)["cpu_percent"]
        handle.abort("benchmark done")
        idle["sender_idle_cpu_percent"] = cpu_percent(idle_s)
    peer.close()
    sender.close()
    return {"transport": transport, "sink": sink, "rows": rows, **idle}


def wait_for_quiet_machine(max_wait_s: float) -> bool:
    """True once no engine_bench runs and the machine is mostly idle; False after max_wait_s."""
    end = time.monotonic() + max_wait_s
    while time.monotonic() < end:
        other = subprocess.run(["pgrep", "-f", "engine_bench"], capture_output=True).returncode == 0
        busy = psutil.cpu_percent(interval=1.0)
        if not other and busy < 25:
            return True
        print(f"waiting: engine_bench running={other}, machine {busy:.0f}% busy", file=sys.stderr, flush=True)
        time.sleep(5)
    print("machine still busy: timings will be noisy", file=sys.stderr, flush=True)
    return False


def markdown(results: list[dict]) -> str:
    lines = ["| transport | sink | tokens | MiB | GB/s median | GB/s best | memcpy GB/s | median / memcpy "
             "| memmove 1 thread GB/s | median / memmove |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in results:
        for row in r["rows"]:
            median, copy, move = row["gbps_median"], row["memcpy_gbps"], row["memmove_1thread_gbps"]
            lines.append(f"| {r['transport']} | {r['sink']} | {row['tokens']} | {row['bytes'] / 2**20:.1f} | "
                         f"{median:.2f} | {row['gbps_best']:.2f} | {copy:.1f} | {median / copy:.0%} | "
                         f"{move:.1f} | {median / move:.0%} |")
    lines += ["", "| transport | receiver idle CPU % | receiver with a transfer waiting, CPU % | "
              "sender idle CPU % |", "|---|---:|---:|---:|"]
    for r in results:
        if "receiver_idle_cpu_percent" in r:
            lines.append(f"| {r['transport']} | {max(0.0, r['receiver_idle_cpu_percent']):.1f} | "
                         f"{max(0.0, r['receiver_pending_cpu_percent']):.1f} | "
                         f"{max(0.0, r['sender_idle_cpu_percent']):.1f} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--role", default="main", choices=("main", "receiver"))
    ap.add_argument("--transports", default="tcp,ucx,shm,local")
    ap.add_argument("--sinks", default="blocks,contiguous", help="sink layouts: blocks, contiguous")
    ap.add_argument("--tokens", default="128,512,1024,2048,4096")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--idle-s", type=float, default=3.0)
    ap.add_argument("--quick", action="store_true", help="3 sizes, 2 repeats, 1 s idle windows")
    ap.add_argument("--max-wait-s", type=float, default=600.0, help="for a quiet machine, then run anyway")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    tokens, sinks = [int(t) for t in args.tokens.split(",")], args.sinks.split(",")
    if args.role == "receiver":
        receiver_main(args.transports, max(tokens), SINKS[sinks[0]])
        return
    if args.quick:
        tokens, args.repeats, args.idle_s = [128, 1024, 4096], 2, 1.0
    quiet = wait_for_quiet_machine(args.max_wait_s)
    results = []
    for transport in args.transports.split(","):
        for k, sink in enumerate(sinks):
            print(f"{transport} into {sink} ...", file=sys.stderr, flush=True)
            results.append(bench_transport(transport, sink, tokens, args.repeats,
                                           args.idle_s if k == 0 else None))
    table = markdown(results)
    print(table)
    if args.json:
        args.json.write_text(json.dumps({
            "date": datetime.datetime.now().isoformat(timespec="seconds"), "host": platform.node(),
            "cpus": os.cpu_count(), "torch": torch.__version__, "quiet_machine": quiet, "results": results,
            "ucx_env": {k: v for k, v in os.environ.items() if k.startswith(("UCX_", "UCXPY_"))},
            "markdown": table}, indent=2))


if __name__ == "__main__":
    main()
