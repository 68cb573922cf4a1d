"""An emulated cluster through the real daemons, against the simulator on the same arrivals.

clsd and N mlsd processes on this host (default 10: 6 prompt + 4 token, the conversation design's
split), every machine on the modelled engine: each step sleeps for Splitwise's profiled
Llama2-70B / 8xH100 time of its batch times `--time-scale` (the machines are slowed down and the
arrivals stretched by the same factor, so queueing is the modelled cluster's while this 2-core
host keeps up), KV layers stream over the real tcp transport (the demo model's KV shape),
tokens go through clsd's real gRPC stream. The same arrivals then run in the simulator with the
same scaled step times. Printed: the share of requests routed to the same (prompt, token) pair,
and TTFT / TPOT / E2E percentiles of both, in modelled seconds (measured / time_scale).

    .venv/bin/python benchmarks/emulated_bench.py [--prompt 6 --token 4] [--rate 6] [--duration 60]
        [--time-scale 4] [--kv-mib 1024] [--trace conv|code] [--out benchmarks/results/emulated_bench.json]

`--rate` is in modelled requests/s (arrivals are sent `time_scale` times slower).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from cls.cli.local_cluster import LocalCluster, LocalConfig, write_local_config  # noqa: E402
from cls.client import AsyncClsClient  # noqa: E402
from cls.sim.result import percentile  # noqa: E402
from cls.sim.simulator import ClusterDesign, Simulator  # noqa: E402
from cls.sim.traces import load_azure_trace  # noqa: E402
from engine.modelled import ProfileLatencyModel  # noqa: E402

PROFILE = REPO.parent / "shared" / "profiles" / "splitwise_perf_model.csv"
TRACES = {"conv": REPO.parent / "shared" / "traces" / "AzureLLMInferenceTrace_conv.csv",
          "code": REPO.parent / "shared" / "traces" / "AzureLLMInferenceTrace_code.csv"}
DEMO = REPO / "models" / "SmolLM2-135M-Instruct"
MAX_PROMPT, MAX_OUTPUT = 4000, 400  # the demo model's context holds prompt + output


class Scaled(ProfileLatencyModel):
    """The profile's step times times `scale` (what the modelled daemons sleep)."""

    def __init__(self, base: ProfileLatencyModel, scale: float):
        self.__dict__.update(base.__dict__)
        self.scale = scale

    def _prefill_s(self, t, b):
        return super()._prefill_s(t, b) * self.scale

    def _decode_s(self, b, c):
        return super()._decode_s(b, c) * self.scale

    def _mixed_s(self, *a):
        return super()._mixed_s(*a) * self.scale


def write_configs(tmp: Path, num_prompt: int, num_token: int, time_scale: float, kv_bytes: int) -> Path:
    clsd = {"model": str(DEMO), "grpc_port": 0, "metrics_port": 0, "http": {"port": None},
            "lease_ttl_s": 10, "heartbeat_interval_s": 1}
    machines = [{"machine_id": f"{home}-{i}", "role": home, "grpc_port": 0, "metrics_port": None,
                 "engine": {"model": str(DEMO), "backend": "modelled", "dtype": "bfloat16",
                            "kv_cache_bytes": kv_bytes,
                            "modelled": {"profile": str(PROFILE), "model": "llama2-70b",
                                         "hardware": "h100-80gb", "tensor_parallel": 8,
                                         "time_scale": time_scale}},
                 "scheduler": {"prompt_token_cap": 2048},
                 "kv_transfer": {"transport": "tcp", "layerwise_min_prompt_tokens": 512}}
                for home, n in (("prompt", num_prompt), ("token", num_token)) for i in range(n)]
    return write_local_config(tmp, clsd, machines)


async def replay(address: str, arrivals, time_scale: float, seed: int):
    rng = random.Random(seed)
    async with AsyncClsClient(address) as client:
        t0 = time.monotonic()

        async def one(a):
            await asyncio.sleep(max(0.0, t0 + a.arrival_s * time_scale - time.monotonic()))
            prompt = [rng.randrange(200, 40000) for _ in range(a.prompt_len)]
            return await client.generate(prompt, max_tokens=a.output_len, ignore_eos=True, timeout_s=600)
        return await asyncio.gather(*(one(a) for a in arrivals), return_exceptions=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--prompt", type=int, default=6)
    ap.add_argument("--token", type=int, default=4)
    ap.add_argument("--rate", type=float, default=6.0, help="modelled requests/s")
    ap.add_argument("--duration", type=float, default=60.0, help="modelled seconds of the trace")
    ap.add_argument("--time-scale", type=float, default=4.0)
    ap.add_argument("--kv-mib", type=int, default=1024,
                    help="KV cache per machine (the demo model's KV shape: 22.5 KiB a token)")
    ap.add_argument("--trace", choices=sorted(TRACES), default="conv")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "emulated_bench.json"))
    args = ap.parse_args()
    for p in (PROFILE, TRACES[args.trace], DEMO / "config.json"):
        if not p.exists():
            print(f"error: {p} is absent (../shared beside the repository; make demo-model)", file=sys.stderr)
            return 1
    arrivals = [a.__class__(a.arrival_s, min(a.prompt_len, MAX_PROMPT), min(a.output_len, MAX_OUTPUT))
                for a in load_azure_trace(TRACES[args.trace], duration_s=args.duration, rate=args.rate)]
    print(f"{len(arrivals)} requests over {args.duration:g} modelled s ({args.rate:g} req/s) on "
          f"{args.prompt} prompt + {args.token} token modelled machines, time scale {args.time_scale:g}",
          flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        local = write_configs(Path(tmp), args.prompt, args.token, args.time_scale, args.kv_mib * 2**20)
        cluster = LocalCluster(LocalConfig.load(local)).start()
        try:
            machines = cluster.client().list_machines()
            blocks = machines[0].kv_blocks_total
            wall0 = time.monotonic()
            results = asyncio.run(replay(cluster.address, arrivals, args.time_scale, args.seed))
            wall_s = time.monotonic() - wall0
        finally:
            cluster.stop()
    failed = [r for r in results if isinstance(r, BaseException)]
    ok = [(a, r) for a, r in zip(arrivals, results) if not isinstance(r, BaseException)]

    base = ProfileLatencyModel.from_csv(PROFILE, model="llama2-70b", hardware="h100-80gb", tensor_parallel=8)
    scaled_arrivals = [a.__class__(a.arrival_s * args.time_scale, a.prompt_len, a.output_len)
                       for a in arrivals]
    design = ClusterDesign(args.prompt, args.token, blocks, 16, max_model_len=8192)
    sim = Simulator(design, Scaled(base, args.time_scale), keep_token_times=False).run(scaled_arrivals)
    sim_by_index = {int(r.request_id[1:]): r for r in sim.requests}
    index = {id(a): i for i, a in enumerate(sorted(arrivals, key=lambda x: x.arrival_s))}
    same = sum((r.prompt_machine, r.token_machine) == (sim_by_index[index[id(a)]].prompt_machine,
                                                       sim_by_index[index[id(a)]].token_machine)
               for a, r in ok)
    ts = args.time_scale

    def pct(values):
        return [round(percentile(values, p) / ts, 4) for p in (50, 90, 99)]
    real = {"ttft": pct([r.timing.ttft_s for _, r in ok]), "e2e": pct([r.timing.e2e_s for _, r in ok]),
            "tpot": pct([r.timing.tpot_s for a, r in ok if a.output_len > 1])}
    fin = sim.finished
    simulated = {"ttft": pct([r.ttft_s for r in fin]), "e2e": pct([r.e2e_s for r in fin]),
                 "tpot": pct([r.tpot_s for r in fin if r.tpot_s is not None])}
    out = {"machines": args.prompt + args.token, "num_prompt": args.prompt, "num_token": args.token,
           "rate": args.rate, "duration_s": args.duration, "time_scale": ts, "trace": args.trace,
           "num_requests": len(arrivals), "num_failed": len(failed), "wall_s": round(wall_s, 1),
           "same_route_share": round(same / max(1, len(ok)), 3), "kv_blocks_per_machine": blocks,
           "daemons_p50_p90_p99_s": real, "simulator_p50_p90_p99_s": simulated,
           "errors": sorted({repr(e)[:200] for e in failed})}
    print(json.dumps(out, indent=2))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2) + "\n")
    return 0 if not failed else 1


if __name__ == "__main__":
    sys.exit(main())
