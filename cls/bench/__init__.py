"""`clsctl bench`: a load generator in the conventions of `vllm bench serve`.

One idea per module:
- `datasets`: request lengths (Azure traces, random) and prompts of real text to exact token counts.
- `arrivals`: when each request is sent (Poisson / gamma, seeded; `inf` = all at once).
- `backends`: the result type of one request; `grpc_backend` and `openai_backend` send it.
- `runner`: the asyncio loop that sends requests on schedule under a concurrency bound.
- `metrics`: pure figures from the per-request results (percentiles, TPOT, goodput by SLO).
- `progress`: a tiny progress bar on stderr.
- `report`: the end-of-run summary table (vLLM's layout) and the result JSON (vLLM's keys).
- `plots`: the PNGs of a run, drawn with the generic helpers in `cls/sim/plots.py`.
- `cli`: the command line (`add_parser` is what `cls/cli/clsctl.py` registers).
"""
