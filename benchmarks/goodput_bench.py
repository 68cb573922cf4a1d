"""Goodput on real processes: Splitwise's 1 prompt + 1 token machine against 2 colocated machines
(prompt-first mixing, and chunked prefill), on the same arrivals and the same SLOs.

    .venv/bin/python benchmarks/goodput_bench.py [--rates 0.5,1,1.5,2,3,4] [--num-prompts 50]
        [--length-scale 0.2] [--chunk-budget 128] [--threads 1] [--transport shm]
        [--designs splitwise,prompt_first,chunked] [--out benchmarks/results/goodput_bench.json]
        [--plot-dir benchmarks/results/goodput_plots]

1. Requests: (prompt, output) lengths sampled from the Azure conversation trace (`clsctl bench`'s
   azure-conv dataset, scaled by --length-scale), prompts of real text to those lengths; the
   arrival gaps are drawn once (seeded Poisson) and replayed at every rate, for every design.
2. Per design: clsd's and the two machines' configs are written into a temp dir and started
   with LocalCluster (demo model, bfloat16, --threads torch threads per machine); all designs are
   up at once (an idle cluster costs next to no CPU). Per design two warm-up requests, then
   --probes requests of the dataset's median lengths one at a time (uncontended latency). Then
   each rate, low to high, runs on every design in turn (the order rotating per rate), so a
   change in the host's other load falls on all designs alike; a run waits for its last request.
   Every cluster is stopped whatever happens (error, Ctrl-C, SIGTERM).
3. SLOs are multiples of Splitwise's uncontended medians (its probes), the same ms for every design
   (see SLOS). A request meets an SLO when it succeeded and every target holds; attainment = such
   requests / all requests; goodput = the highest rate whose attainment, and that of every lower
   rate, is >= 90% (cls/bench/metrics.py). Ratio = Splitwise / the better colocated design.
4. Per run, CPU time (psutil) of the running design's clsd and mlsd processes, this process (the
   load generator), the idle designs' processes and the rest of the host (other users), in cores:
   the 2 "machines" share this host's cores.
5. Output: tables on stdout, JSON (--out), PNGs (--plot-dir): attainment against rate per SLO,
   TTFT / TPOT / ITL CDFs per rate with one line per design.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import re
import signal
import statistics
import sys
import tempfile
import time
import urllib.request
from datetime import datetime
from pathlib import Path

import numpy as np
import psutil

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from cls.bench.arrivals import offsets_s, unit_gaps  # noqa: E402
from cls.bench.backends import make_backend  # noqa: E402
from cls.bench.datasets import BenchRequest, PromptMaker, azure_lengths, build_requests  # noqa: E402
from cls.bench.metrics import goodput_rate, request_tpot_s  # noqa: E402
from cls.bench.outputs import RequestOutput  # noqa: E402
from cls.bench.runner import run_requests  # noqa: E402
from cls.cli.local_cluster import LocalCluster, LocalConfig, write_local_config  # noqa: E402
from cls.sim import plots as report_plots  # noqa: E402
from engine.tokenizer import Tokenizer  # noqa: E402

DEMO = REPO / "models" / "SmolLM2-135M-Instruct"
KV_BYTES = 512 * 2**20          # per machine: ~22k tokens of the demo model, far above the load
MAX_NUM_SEQS = 32               # same on every machine; chunked needs budget >= this
TARGET = 0.9
REQUEST_TIMEOUT_S = 300.0
DESIGNS = {  # name: (label, clsd router.colocated, [(machine_id, home role)], mixed_policy)
    "splitwise": ("Splitwise 1P+1T", False, [("prompt-0", "prompt"), ("token-0", "token")], "prompt_first"),
    "prompt_first": ("colocated prompt-first", True, [("coloc-0", "token"), ("coloc-1", "token")],
                     "prompt_first"),
    "chunked": ("colocated chunked", True, [("coloc-0", "token"), ("coloc-1", "token")], "chunked"),
}
# SLO name -> {metric: (base, multiple)}: the request's metric must be <= multiple x the base
# (Splitwise's uncontended median of that base). Request metrics: ttft, tpot, tbt_max (its
# longest gap between tokens); bases: ttft, tpot, itl (the median gap between tokens).
SLOS = {
    "tbt": {"ttft": ("ttft", 10.0), "tpot": ("tpot", 2.0)},         # TBT-bound (mean): tight TPOT
    "tbt_max": {"ttft": ("ttft", 10.0), "tbt_max": ("itl", 10.0)},  # TBT-bound (tail): no long stall
    "ttft": {"ttft": ("ttft", 5.0), "tpot": ("tpot", 5.0)},        # TTFT-bound: tight TTFT
}


def request_values_ms(o: RequestOutput) -> dict[str, float]:
    return {"ttft": o.ttft_s * 1e3, "tpot": request_tpot_s(o) * 1e3,
            "tbt_max": max(o.itl_s, default=0.0) * 1e3}


def attainment(outputs: list[RequestOutput], targets_ms: dict[str, float]) -> float:
    def ok(o):
        return o.success and all(request_values_ms(o)[k] <= v for k, v in targets_ms.items())
    return sum(ok(o) for o in outputs) / len(outputs) if outputs else 0.0


def write_configs(tmp: Path, design: str, args) -> Path:
    _, colocated, machines, policy = DESIGNS[design]
    clsd = {"model": str(DEMO), "grpc_port": 0, "metrics_port": 0, "lease_ttl_s": 10,
            "http": {"port": 0 if args.backend != "grpc" else None},
            "router": {"colocated": colocated},
            "limits": {"request_timeout_s": REQUEST_TIMEOUT_S}}
    configs = [{"machine_id": machine_id, "role": role, "grpc_port": 0, "metrics_port": None,
                "engine": {"model": str(DEMO), "dtype": "bfloat16", "device": "cpu",
                           "kv_cache_bytes": KV_BYTES, "max_num_seqs": MAX_NUM_SEQS,
                           "num_threads": args.threads},
                "scheduler": {"mixed_policy": policy, "max_num_batched_tokens": args.chunk_budget},
                "kv_transfer": {"transport": args.transport if not colocated else "tcp"}}
               for machine_id, role in machines]
    return write_local_config(tmp, clsd, configs, Path(args.log_dir) / design if args.log_dir else None)


class CpuMeter:
    """CPU seconds of every cluster's processes, this process (the load generator) and the whole
    host between two marks; `cores` splits them for the design that was running."""

    def __init__(self, clusters: dict[str, LocalCluster]):
        self.procs = {(design, d.name): psutil.Process(d.proc.pid)
                      for design, c in clusters.items() for d in (c.clsd, *c.machines)}
        self.procs[("", "loadgen")] = psutil.Process()

    def mark(self) -> dict:
        out = {key: sum(p.cpu_times()[:2]) for key, p in self.procs.items()}
        t = psutil.cpu_times()
        out["host_busy"] = sum(t) - t.idle - getattr(t, "iowait", 0.0)
        out["wall"] = time.monotonic()
        return out

    def cores(self, a: dict, b: dict, design: str) -> dict[str, float]:
        """Cores used: the running design's clsd and machines, `loadgen`, `idle_clusters` (the
        other designs, waiting), `others` (the rest of the host: other users) and `host_busy`."""
        wall = b["wall"] - a["wall"]
        used = {k: (b[k] - a[k]) / wall for k in a if k != "wall"}
        out = {name: used[(d, name)] for d, name in self.procs if d == design}
        out["loadgen"] = used[("", "loadgen")]
        out["idle_clusters"] = sum(v for k, v in used.items()
                                   if isinstance(k, tuple) and k[0] not in ("", design))
        out["host_busy"] = used["host_busy"]
        out["others"] = used["host_busy"] - sum(v for k, v in used.items() if isinstance(k, tuple))
        return {k: round(v, 3) for k, v in out.items()}


def clsd_counters(port: int) -> dict[str, float]:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    out = {}
    for m in re.finditer(r'^(clsd_routed_requests_total|clsd_pool_events_total)\{(\w+)="(\w+)"\} (\S+)$',
                         text, re.M):
        out[f"{m[1]}:{m[3]}"] = float(m[4])
    return out


def summary(outputs: list[RequestOutput]) -> dict:
    ok = [o for o in outputs if o.success]
    vals = [request_values_ms(o) for o in ok]

    def pct(key, p):
        xs = [v[key] for v, o in zip(vals, ok) if key != "tpot" or o.output_len > 1]
        return round(float(np.percentile(xs, p)), 2) if xs else None
    itl = [g * 1e3 for o in ok for g in o.itl_s]
    return {"completed": len(ok), "failed": len(outputs) - len(ok),
            **{f"p{p}_{k}_ms": pct(k, p) for k in ("ttft", "tpot") for p in (50, 90, 99)},
            **{f"p{p}_itl_ms": round(float(np.percentile(itl, p)), 2) if itl else None for p in (50, 90, 99)},
            "errors": sorted({o.error[:200] for o in outputs if not o.success})}


async def run_sweep(clusters: dict[str, LocalCluster], args, requests, probe: BenchRequest, gaps,
                    tokenizer) -> dict:
    """Probes on every design, then each rate on every design in turn (the order rotates by one
    design per rate), so a change in the host's other load falls on all designs alike."""
    meter = CpuMeter(clusters)
    backends = {}
    for design, cluster in clusters.items():
        address = cluster.address if args.backend == "grpc" else cluster.http_url.removesuffix("/v1")
        backends[design] = make_backend(args.backend, address, model=None, ignore_eos=True,
                                        temperature=0.0, timeout_s=REQUEST_TIMEOUT_S)
        await backends[design].__aenter__()
    results = {design: {"probes": [], "runs": []} for design in clusters}
    try:
        for design, backend in backends.items():
            if args.backend != "grpc":
                backend.count_tokens_with(tokenizer)
                backend.model = await backend.served_model()
            for _ in range(2):  # first calls pay torch's one-time set-up
                await backend.send(probe)
            results[design]["probes"] = [await backend.send(probe) for _ in range(args.probes)]
        order = list(clusters)
        for i, rate in enumerate(args.rates):
            for design in order[i % len(order):] + order[:i % len(order)]:
                before = meter.mark()
                run = await run_requests(backends[design], requests, offsets_s(gaps, rate))
                cpu = meter.cores(before, meter.mark(), design)
                results[design]["runs"].append({"rate": rate, "duration_s": run.duration_s,
                                                "outputs": run.outputs, "cpu_cores": cpu})
                print(f"  {DESIGNS[design][0]} at {rate:g} req/s: {run.duration_s:.1f} s, "
                      f"{sum(o.success for o in run.outputs)}/{len(requests)} ok, cpu {cpu}", flush=True)
    finally:
        for backend in backends.values():
            await backend.__aexit__(None, None, None)
    return results


def base_latency(probes: list[RequestOutput]) -> dict[str, float]:
    """Medians over uncontended requests: TTFT, TPOT, the gap between tokens (all gaps pooled),
    and the longest gap of a request."""
    ok = [o for o in probes if o.success]
    if not ok:
        raise RuntimeError("every uncontended probe request failed")
    values = [request_values_ms(o) for o in ok]
    return {"ttft": statistics.median(v["ttft"] for v in values),
            "tpot": statistics.median(v["tpot"] for v in values),
            "itl": statistics.median([g * 1e3 for o in ok for g in o.itl_s] or [0.0]),
            "tbt_max": statistics.median(v["tbt_max"] for v in values)}


def report(args, requests, results: dict, base: dict) -> dict:
    """The result document: SLOs in ms, per design and rate the attainment of each SLO, latency
    percentiles and CPU use; goodput per design and SLO; Splitwise / the better colocated."""
    slos_ms = {name: {k: round(x * base[b], 2) for k, (b, x) in slo.items()} for name, slo in SLOS.items()}
    doc = {"date": datetime.now().isoformat(timespec="seconds"), "argv": sys.argv, "args": vars(args),
           "host": {"cpus": psutil.cpu_count(), "load_avg_at_start": args.load_at_start},
           "input_lens": [r.prompt_len for r in requests],
           "output_lens": [r.output_len for r in requests], "base_ms": base,
           "slo_multiples": {n: {k: list(v) for k, v in slo.items()} for n, slo in SLOS.items()},
           "slo_ms": slos_ms, "designs": {}}
    for design, res in results.items():
        d = {"label": DESIGNS[design][0], "uncontended_ms": base_latency(res["probes"]),
             "counters": res.get("counters", {}), "runs": []}
        for run in res["runs"]:
            outs = run["outputs"]
            d["runs"].append({"rate": run["rate"], "duration_s": round(run["duration_s"], 2),
                              "attainment": {n: attainment(outs, slo) for n, slo in slos_ms.items()},
                              "cpu_cores": run["cpu_cores"], **summary(outs),
                              "ttfts": [o.ttft_s for o in outs],
                              "tpots": [request_tpot_s(o) if o.success else None for o in outs],
                              "itls": [o.itl_s for o in outs]})
        rates = [r["rate"] for r in d["runs"]]
        d["goodput_rate"] = {n: goodput_rate(rates, [r["attainment"][n] for r in d["runs"]], TARGET)
                             for n in slos_ms}
        doc["designs"][design] = d
    ratios = {}
    for name in slos_ms:
        split = doc["designs"]["splitwise"]["goodput_rate"][name]
        coloc = [d["goodput_rate"][name] for k, d in doc["designs"].items() if k != "splitwise"]
        best = max((g for g in coloc if g is not None), default=None)
        ratios[name] = split / best if split is not None and best else None
    doc["ratio_splitwise_to_best_colocated"] = ratios
    return doc


def print_tables(doc: dict) -> None:
    base, slos = doc["base_ms"], doc["slo_ms"]
    print("\nuncontended (Splitwise probes, median): "
          + ", ".join(f"{k} {v:.1f} ms" for k, v in base.items()))
    for name, slo in slos.items():
        print(f"SLO {name}: " + ", ".join(f"{k} <= {v:g} ms" for k, v in slo.items()))
    print("\nattainment (%) by rate; goodput = highest rate with >= 90% there and at every lower rate")
    print(f"{'design':<24}{'rate':>5} " + "".join(f"{n:>9}" for n in slos) + f"{'TTFT p50/p99':>15}"
          f"{'TPOT p50/p99':>15}{'ITL p99':>9}  CPU cores: clsd, machines, loadgen, others")
    for d in doc["designs"].values():
        for r in d["runs"]:
            cpu = r["cpu_cores"]
            machines = "+".join(f"{v:.2f}" for k, v in cpu.items()
                                if k not in ("clsd", "loadgen", "others", "host_busy", "idle_clusters"))
            att = "".join(f"{100 * r['attainment'][n]:>9.1f}" for n in slos)
            print(f"{d['label']:<24}{r['rate']:>5g} {att}"
                  f"{r['p50_ttft_ms']:>7.0f}/{r['p99_ttft_ms']:<7.0f}{r['p50_tpot_ms']:>7.1f}/"
                  f"{r['p99_tpot_ms']:<7.1f}{r['p99_itl_ms']:>9.0f}  {cpu['clsd']:.2f}, {machines}, "
                  f"{cpu['loadgen']:.2f}, {cpu['others']:.2f}")
    print()
    for name in slos:
        ratio = doc["ratio_splitwise_to_best_colocated"][name]
        print(f"goodput {name} (req/s): " + ", ".join(f"{d['label']} {d['goodput_rate'][name]}"
                                                   for d in doc["designs"].values())
              + (f"; Splitwise / best colocated {ratio:.2f}x" if ratio is not None else "; ratio undefined"
                 " (a goodput is none: that design misses at the lowest rate)"))


def plots(doc: dict, results: dict, plot_dir: Path) -> list[Path]:
    paths = []
    for name in doc["slo_ms"]:
        series = {d["label"]: ([r["rate"] for r in d["runs"]], [r["attainment"][name] for r in d["runs"]])
                  for d in doc["designs"].values()}
        slo = ", ".join(f"{k} <= {v:g} ms" for k, v in doc["slo_ms"][name].items())
        paths.append(report_plots.attainment_vs_rate(series, plot_dir / f"attainment_{name}.png",
                                                     title=f"SLO {name} ({slo})", target=TARGET))
    slo_line = {"ttft": doc["slo_ms"]["ttft"]["ttft"], "tpot": doc["slo_ms"]["tbt"]["tpot"],
                "itl": doc["slo_ms"]["tbt_max"]["tbt_max"]}
    for i, rate in enumerate(doc["args"]["rates"]):
        for metric in ("ttft", "tpot", "itl"):
            series = {}
            for design, res in results.items():
                ok = [o for o in res["runs"][i]["outputs"] if o.success]
                series[DESIGNS[design][0]] = (
                    [o.ttft_s * 1e3 for o in ok] if metric == "ttft" else
                    [request_tpot_s(o) * 1e3 for o in ok if o.output_len > 1] if metric == "tpot" else
                    [g * 1e3 for o in ok for g in o.itl_s])
            paths.append(report_plots.latency_cdf(series, plot_dir / f"{metric}_cdf_{rate:g}rps.png",
                                                  title=f"{metric.upper()} CDF at {rate:g} req/s",
                                                  slo=slo_line[metric]))
    return paths


def _interrupt(signum, frame) -> None:
    # SIGTERM unwinds like Ctrl-C, so the finally blocks in main stop every daemon.
    raise KeyboardInterrupt(f"signal {signum}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--designs", default="splitwise,prompt_first,chunked")
    ap.add_argument("--rates", default="0.5,1,1.5,2,3,4", help="req/s, comma-separated")
    ap.add_argument("--num-prompts", type=int, default=50)
    ap.add_argument("--length-scale", type=float, default=0.2)
    ap.add_argument("--probes", type=int, default=5, help="uncontended requests, one at a time")
    ap.add_argument("--chunk-budget", type=int, default=128, help="chunked: max_num_batched_tokens")
    ap.add_argument("--threads", type=int, default=1, help="torch threads per machine")
    ap.add_argument("--transport", default="shm", choices=("shm", "tcp"), help="Splitwise's KV transport")
    ap.add_argument("--backend", default="grpc", choices=("grpc", "openai"))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--log-dir", default=None, help="keep the daemons' logs here (default: a temp dir)")
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "goodput_bench.json"))
    ap.add_argument("--plot-dir", default=str(REPO / "benchmarks" / "results" / "goodput_plots"))
    args = ap.parse_args()
    args.rates = sorted({float(r) for r in args.rates.split(",") if r.strip()})
    designs = [d.strip() for d in args.designs.split(",") if d.strip()]
    if bad := [d for d in designs if d not in DESIGNS]:
        ap.error(f"--designs: unknown design {bad[0]!r}; choose from {', '.join(DESIGNS)}")
    if "splitwise" not in designs:
        ap.error("--designs must include splitwise: its uncontended latency sets the SLOs")
    if not args.rates or any(not (r > 0 and math.isfinite(r)) for r in args.rates):
        ap.error("--rates must be finite numbers > 0")
    if args.chunk_budget < MAX_NUM_SEQS:
        ap.error(f"--chunk-budget must be >= {MAX_NUM_SEQS} (engine.max_num_seqs)")
    args.load_at_start = [round(x, 2) for x in psutil.getloadavg()]
    signal.signal(signal.SIGTERM, _interrupt)
    signal.signal(signal.SIGINT, signal.default_int_handler)  # also when started with SIGINT ignored

    tokenizer = Tokenizer(str(DEMO))
    lengths = azure_lengths("azure-conv", args.num_prompts, args.seed, args.length_scale)
    requests = build_requests(lengths, PromptMaker(tokenizer), args.seed)
    p50 = (int(np.median([p for p, _ in lengths])), int(np.median([o for _, o in lengths])))
    probe = BenchRequest(PromptMaker(tokenizer).make(p50[0], 7), p50[0], p50[1])
    gaps = unit_gaps(len(requests), 1.0, args.seed)
    print(f"{len(requests)} requests (azure-conv x{args.length_scale:g}: "
          f"{sum(p for p, _ in lengths)} prompt, "
          f"{sum(o for _, o in lengths)} output tokens; probe {p50[0]}/{p50[1]}) at {args.rates} req/s; "
          f"load average {args.load_at_start}", flush=True)
    clusters: dict[str, LocalCluster] = {}
    with tempfile.TemporaryDirectory(prefix="goodput-") as tmp:
        try:
            for design in designs:  # an idle cluster costs next to no CPU: all are up at once
                (Path(tmp) / design).mkdir()
                clusters[design] = LocalCluster(LocalConfig.load(write_configs(Path(tmp) / design,
                                                                               design, args)))
                clusters[design].start()
                print(f"{DESIGNS[design][0]}: up", flush=True)
            results = asyncio.run(run_sweep(clusters, args, requests, probe, gaps, tokenizer))
            for design, cluster in clusters.items():
                results[design]["counters"] = clsd_counters(cluster.metrics_port)
        finally:
            for design, cluster in clusters.items():
                codes = cluster.stop()
                alive = [d.name for d in (cluster.clsd, *cluster.machines)
                         if d and d.proc and d.proc.poll() is None]
                print(f"{design} stopped: {codes}" + (f"; STILL RUNNING: {alive}" if alive else ""),
                      flush=True)
    doc = report(args, requests, results, base_latency(results["splitwise"]["probes"]))
    print_tables(doc)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(doc, indent=1) + "\n")
    paths = plots(doc, results, Path(args.plot_dir))
    print(f"\nresult: {out}\nplots: {Path(args.plot_dir)} ({len(paths)} files)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
