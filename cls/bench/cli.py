"""`clsctl bench`: load a serving endpoint the way `vllm bench serve` does and report the figures.

    clsctl bench --backend grpc --base-url 127.0.0.1:50050 --dataset azure-conv \
        --length-scale 0.05 --num-prompts 20 --request-rate 2 --goodput ttft:2000 tpot:200 \
        --save-result --plot-dir .run/bench

1. Check every flag (a bad one: `clsctl bench: error: <what>` on stderr, exit 2).
2. Build the requests: dataset lengths, prompts of real text to exactly those token counts.
3. Draw the arrival gaps once (seeded); run them at `--request-rate`, or at each rate of
   `--sweep-rates` (the same pattern scaled to each rate).
4. Print vLLM's summary table per run (and the sweep table), write the JSON and the plots.
Exit 0 when at least one request completed, 1 otherwise (the failures are counted and shown).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import sys
from collections import Counter
from datetime import datetime
from pathlib import Path

DEFAULT_TOKENIZER = "models/SmolLM2-135M-Instruct"
DEFAULT_OPENAI_URL = "http://127.0.0.1:8000"


def _rate(text: str) -> float:
    try:
        rate = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a rate (a number of req/s or inf)") from None
    if not rate > 0:
        raise argparse.ArgumentTypeError(f"a rate must be > 0 req/s (or inf), got {text}")
    return rate


def _rates(text: str) -> list[float]:
    rates = [_rate(r) for r in text.split(",") if r.strip()]
    if not rates or any(math.isinf(r) for r in rates):
        raise argparse.ArgumentTypeError(f"sweep rates {text!r} must be finite numbers like 1,2,4")
    return sorted(set(rates))


def _positive(kind):
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a {kind.__name__}") from None
        if not value > 0 or (kind is float and not math.isfinite(value)):
            raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
        return value

    return parse


def _check(args: argparse.Namespace, parser: argparse.ArgumentParser) -> dict:
    """Flag checks that need more than one flag, or parsing beyond argparse; returns the parsed
    SLOs, percentile settings and rates."""
    from cls.bench.metrics import parse_goodput, parse_percentile_metrics, parse_percentiles

    try:
        slo_ms = parse_goodput(args.goodput or [])
        selected = parse_percentile_metrics(args.percentile_metrics)
        percentiles = parse_percentiles(args.metric_percentiles)
    except ValueError as e:
        parser.error(str(e))
    if args.sweep_rates and args.request_rate is not None:
        parser.error("give --request-rate or --sweep-rates, not both")
    if args.sweep_rates and not slo_ms:
        parser.error("--sweep-rates needs SLOs to report attainment: add --goodput ttft:MS ...")
    if not 0 < args.attainment_target <= 100:
        parser.error(f"--attainment-target must be in (0, 100] percent, got {args.attainment_target}")
    if not 0 <= args.random_range_ratio < 1:
        parser.error(f"--random-range-ratio must be in [0, 1), got {args.random_range_ratio}")
    if args.temperature < 0 or not math.isfinite(args.temperature):
        parser.error(f"--temperature must be a finite number >= 0, got {args.temperature}")
    if args.backend == "grpc":
        address = args.base_url or _default_grpc_address()
        if "://" in address or ":" not in address:
            parser.error(f"--base-url for the grpc backend is host:port of clsd, got {address!r}")
    else:
        address = args.base_url or DEFAULT_OPENAI_URL
        if not address.startswith(("http://", "https://")):
            parser.error(f"--base-url for the {args.backend} backend is http://host:port, got {address!r}")
    if not (Path(args.tokenizer) / "tokenizer.json").is_file():
        parser.error(f"--tokenizer {args.tokenizer}: no tokenizer.json there "
                     f"(`clsctl models fetch-demo` fetches the demo model)")
    rates = args.sweep_rates or [args.request_rate if args.request_rate is not None else math.inf]
    return dict(slo_ms=slo_ms, selected=selected, percentiles=percentiles, rates=rates, address=address)


def _default_grpc_address() -> str:
    from cls.client import default_address

    return default_address()


def _requests(args: argparse.Namespace, parser: argparse.ArgumentParser):
    from cls.bench.datasets import (
        DatasetError,
        PromptMaker,
        azure_lengths,
        build_requests,
        random_lengths,
        scale_len,
    )
    from engine.tokenizer import Tokenizer

    tokenizer = Tokenizer(args.tokenizer)
    try:
        if args.dataset == "random":
            lengths = random_lengths(args.num_prompts, scale_len(args.random_input_len, args.length_scale),
                                     scale_len(args.random_output_len, args.length_scale),
                                     args.random_range_ratio, args.seed)
        else:
            lengths = azure_lengths(args.dataset, args.num_prompts, args.seed, args.length_scale,
                                    args.dataset_path)
        return tokenizer, build_requests(lengths, PromptMaker(tokenizer), args.seed)
    except DatasetError as e:
        parser.error(f"--dataset {args.dataset}: {e}")


async def _run_all(args, checked, requests, tokenizer):
    from cls.bench.arrivals import offsets_s, unit_gaps
    from cls.bench.backends import make_backend
    from cls.bench.runner import run_requests
    from cls.cli.progress import Progress

    backend = make_backend(args.backend, checked["address"], model=args.model, ignore_eos=args.ignore_eos,
                           temperature=args.temperature, timeout_s=args.timeout, endpoint=args.endpoint)
    gaps = unit_gaps(len(requests), args.burstiness, args.seed)
    runs = []
    async with backend:
        if args.backend != "grpc":
            backend.count_tokens_with(tokenizer)
            if backend.model is None:
                backend.model = await backend.served_model()
        for rate in checked["rates"]:
            label = f"rate {rate:g} req/s" if args.sweep_rates else ""
            progress = Progress(len(requests), label, enabled=not args.no_progress)
            runs.append(await run_requests(backend, requests, offsets_s(gaps, rate),
                                           max_concurrency=args.max_concurrency, progress=progress))
    return runs, getattr(backend, "model", None)


def _cmd_bench(args: argparse.Namespace) -> int:
    from cls.bench.metrics import compute_metrics, goodput_rate
    from cls.bench.report import format_summary, format_sweep, result_json

    parser = args.parser
    checked = _check(args, parser)
    tokenizer, requests = _requests(args, parser)
    slo_ms, target = checked["slo_ms"], args.attainment_target / 100
    burst = "Poisson process" if args.burstiness == 1 else "gamma distribution"
    print(f"Traffic request rate: {', '.join(f'{r:g}' for r in checked['rates'])}")
    print(f"Burstiness factor: {args.burstiness:g} ({burst})")
    print(f"Maximum request concurrency: {args.max_concurrency}")
    try:
        runs, model_id = asyncio.run(_run_all(args, checked, requests, tokenizer))
    except RuntimeError as e:  # the openai backend could not learn the served model
        print(f"error: {e}", file=sys.stderr)
        return 1
    settings = {"date": datetime.now().strftime("%Y%m%d-%H%M%S"), "backend": args.backend,
                "base_url": checked["address"], "model_id": model_id, "tokenizer_id": args.tokenizer,
                "dataset": args.dataset, "length_scale": args.length_scale,
                "num_prompts": args.num_prompts, "burstiness": args.burstiness,
                "max_concurrency": args.max_concurrency, "seed": args.seed,
                "goodput_slo_ms": slo_ms or None}
    results, metrics = [], []
    for rate, run in zip(checked["rates"], runs):
        m = compute_metrics(run.outputs, run.duration_s, slo_ms or None, checked["percentiles"])
        metrics.append(m)
        print(format_summary(m, run.duration_s, request_rate=rate, max_concurrency=args.max_concurrency,
                             selected=checked["selected"]))
        results.append(result_json(m, run.outputs, run.duration_s,
                                   {**settings, "request_rate": rate if math.isfinite(rate) else "inf",
                                    "max_concurrent_requests": run.max_concurrent}))
        _report_errors(run.outputs)
    sweep = None
    if args.sweep_rates:
        attainments = [m.slo_attainment for m in metrics]
        best = goodput_rate(checked["rates"], attainments, target)
        print(format_sweep(checked["rates"], metrics, slo_ms, best, target))
        sweep = (checked["rates"], attainments)
        document = {**settings, "sweep_rates": checked["rates"], "slo_attainment": attainments,
                    "attainment_target": target, "goodput_rate": best, "runs": results}
    else:
        document = results[0]
    if args.save_result or args.result_filename or args.result_dir:
        _save(document, args)
    if args.plot_dir:
        from cls.bench.plots import write_plots

        labels = [f"{r:g} req/s" if math.isfinite(r) else "inf" for r in checked["rates"]]
        paths = write_plots({lb: run.outputs for lb, run in zip(labels, runs)}, args.plot_dir,
                            slo_ms=slo_ms, sweep=sweep, attainment_target=target)
        print(f"plots: {', '.join(str(p) for p in paths)}", file=sys.stderr)
    return 0 if any(m.completed for m in metrics) else 1


def _report_errors(outputs) -> None:
    errors = Counter(o.error for o in outputs if not o.success)
    for error, count in errors.most_common(5):
        print(f"failed x{count}: {error}", file=sys.stderr)


def _save(document: dict, args: argparse.Namespace) -> None:
    rate = "sweep" if args.sweep_rates else f"{args.request_rate or 'inf'}qps"
    name = args.result_filename or f"{args.backend}-{rate}-{args.dataset}-{document['date']}.json"
    path = Path(args.result_dir or ".") / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(document, indent=2) + "\n")
    print(f"result: {path}", file=sys.stderr)


def add_parser(groups: argparse._SubParsersAction) -> None:
    from cls.bench.backends import BACKENDS
    from cls.bench.datasets import DATASETS

    p = groups.add_parser(
        "bench", help="load-test clsd (gRPC) or an OpenAI endpoint, vllm bench serve style",
        description="Send a dataset of requests at a Poisson/gamma arrival rate, measure TTFT, "
                    "TPOT, ITL and E2E latency per request, and print the summary in the layout "
                    "of `vllm bench serve`; optionally a JSON result, plots and a rate sweep.")
    g = p.add_argument_group("target")
    g.add_argument("--backend", choices=BACKENDS, default="grpc")
    g.add_argument("--base-url", default=None, metavar="URL",
                   help="grpc: clsd's host:port (default $CLSD_ADDRESS, else 127.0.0.1:50050); "
                        f"openai: http://host:port (default {DEFAULT_OPENAI_URL})")
    g.add_argument("--endpoint", default=None, metavar="PATH",
                   help="openai: the API path (default /v1/completions, /v1/chat/completions)")
    g.add_argument("--model", default=None, help="openai: model name (default: the first of /v1/models)")
    g.add_argument("--tokenizer", default=DEFAULT_TOKENIZER, metavar="DIR",
                   help=f"model folder whose tokenizer sizes the prompts (default {DEFAULT_TOKENIZER})")
    g.add_argument("--timeout", type=_positive(float), default=None, metavar="S",
                   help="deadline of each request (default none)")
    g = p.add_argument_group("load")
    g.add_argument("--num-prompts", type=_positive(int), default=100, metavar="N")
    g.add_argument("--request-rate", type=_rate, default=None, metavar="RPS",
                   help="mean requests/s; inf (default) sends all at once")
    g.add_argument("--burstiness", type=_positive(float), default=1.0,
                   help="gamma shape of the gaps: 1 = Poisson (default), < 1 burstier")
    g.add_argument("--max-concurrency", type=_positive(int), default=None, metavar="N",
                   help="at most N requests in flight (default unbounded)")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--sweep-rates", type=_rates, default=None, metavar="R1,R2,...",
                   help="run the same arrival pattern at each rate; needs --goodput")
    g.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    g = p.add_argument_group("dataset")
    g.add_argument("--dataset", choices=DATASETS, default="random")
    g.add_argument("--dataset-path", default=None, metavar="CSV",
                   help="Azure trace file (default ../shared/traces/AzureLLMInferenceTrace_*.csv)")
    g.add_argument("--length-scale", type=_positive(float), default=1.0, metavar="X",
                   help="multiply every prompt and output length by X (small models, slow hosts)")
    g.add_argument("--random-input-len", type=_positive(int), default=1024, metavar="N")
    g.add_argument("--random-output-len", type=_positive(int), default=128, metavar="N")
    g.add_argument("--random-range-ratio", type=float, default=0.0, metavar="R",
                   help="random lengths are uniform in len*(1-R)..len*(1+R) (default 0)")
    g.add_argument("--ignore-eos", action="store_true",
                   help="generate exactly the dataset's output lengths (openai: sends ignore_eos)")
    g.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    g = p.add_argument_group("report")
    g.add_argument("--goodput", nargs="+", default=None, metavar="NAME:MS",
                   help="SLOs, e.g. ttft:500 tpot:50 e2el:5000 (ms): goodput and attainment")
    g.add_argument("--attainment-target", type=float, default=90.0, metavar="PCT",
                   help="sweep goodput = highest rate with at least PCT%% attainment (default 90)")
    g.add_argument("--percentile-metrics", default="ttft,tpot,itl", metavar="LIST",
                   help="metrics in the summary, of ttft,tpot,itl,e2el (default ttft,tpot,itl)")
    g.add_argument("--metric-percentiles", default="99", metavar="LIST",
                   help="percentiles in the summary, e.g. 50,90,99 (default 99)")
    g.add_argument("--save-result", action="store_true", help="write the result JSON")
    g.add_argument("--result-dir", default=None, metavar="DIR", help="folder of the JSON (default .)")
    g.add_argument("--result-filename", default=None, metavar="NAME",
                   help="JSON file name (default BACKEND-RATEqps-DATASET-DATE.json)")
    g.add_argument("--plot-dir", default=None, metavar="DIR", help="write PNG plots here")
    p.set_defaults(func=_cmd_bench, parser=p)
