"""The cluster simulator (virtual time, the daemons' own router and machine policies) and the
trace loaders it replays."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from cls.sim.report import SPLITWISE_SLO, Reference, SloError, SloReport, goodput_rate, parse_slo
from cls.sim.result import percentile
from cls.sim.simulator import ClusterDesign, Simulator
from cls.sim.traces import Arrival, TraceError, gamma_arrivals, load_azure_trace, poisson_arrivals
from engine.modelled import LINKS, MODEL_SHAPES, LatencyModel, ProfileLatencyModel, kv_transfer_s
from tests.conftest import SHARED

PROFILE = SHARED / "profiles" / "splitwise_perf_model.csv"
CODE_TRACE = SHARED / "traces" / "AzureLLMInferenceTrace_code.csv"
CONV_TRACE = SHARED / "traces" / "AzureLLMInferenceTrace_conv.csv"
LLAMA = MODEL_SHAPES["llama2-70b"]


class FakeLatency(LatencyModel):
    """Exact arithmetic: prefill 10 ms + 1 ms per token; decode 20 ms + 1 ms per extra request."""

    def _prefill_s(self, batch_tokens, batch_size):
        return 0.010 + 0.001 * batch_tokens

    def _decode_s(self, batch_size, context_tokens):
        return 0.020 + 0.001 * (batch_size - 1)

    def _mixed_s(self, prefill_tokens, num_prefills, num_decodes, decode_context_tokens):
        raise AssertionError("the simulator runs prefill and decode steps apart")


def design(num_prompt=1, num_token=1, kv_blocks=4096, **kw) -> ClusterDesign:
    return ClusterDesign(num_prompt, num_token, kv_blocks, **kw)


def simulate(d: ClusterDesign, arrivals, latency=None):
    return Simulator(d, latency or FakeLatency(), seed=0).run(arrivals)


@pytest.fixture(scope="module")
def profile() -> ProfileLatencyModel:
    if not PROFILE.is_file():
        pytest.skip(f"Splitwise profile absent at {PROFILE} (../shared/profiles is not checked out)")
    return ProfileLatencyModel.from_csv(PROFILE, model="llama2-70b", hardware="h100-80gb",
                                        tensor_parallel=8)


def need_trace(path):
    if not path.is_file():
        pytest.skip(f"Azure trace absent at {path} (../shared/traces is not checked out)")
    return path


# -- the simulator --------------------------------------------------------------------------------

def test_single_request_ttft_is_prefill_plus_transfer_and_tbt_is_the_decode_step():
    d = design(model_shape=LLAMA, link_bytes_s=LINKS["infiniband-400g"])
    result = simulate(d, [Arrival(1.0, 1000, 5)])
    (r,) = result.requests
    prefill_s = 0.010 + 0.001 * 1000
    transfer_s = kv_transfer_s(1000, LLAMA, LINKS["infiniband-400g"], True, prefill_s)
    assert transfer_s > 0
    assert not r.colocated and (r.prompt_machine, r.token_machine) == ("prompt-0", "token-0")
    assert r.ttft_s == pytest.approx(prefill_s + transfer_s)
    assert r.tbts_s == pytest.approx([0.020] * 4)
    assert r.e2e_s == pytest.approx(prefill_s + transfer_s + 4 * 0.020)
    assert result.ttft_s(50) == pytest.approx(r.ttft_s) and result.tbt_s(99) == pytest.approx(0.020)


def test_runs_are_deterministic_and_every_request_gets_exactly_its_tokens():
    arrivals = poisson_arrivals(20, 5, (50, 3000), (1, 60), seed=3)
    d = design(num_prompt=2, num_token=1, kv_blocks=2000)
    a, b = simulate(d, arrivals), simulate(d, arrivals)
    assert [(r.request_id, r.prompt_machine, r.token_machine, r.token_times_s) for r in a.requests] \
        == [(r.request_id, r.prompt_machine, r.token_machine, r.token_times_s) for r in b.requests]
    assert a.summary() == b.summary()
    assert not a.rejected and len(a.finished) == len(arrivals)
    by_id = {r.request_id: r for r in a.requests}
    for i, arrival in enumerate(sorted(arrivals, key=lambda x: x.arrival_s)):
        r = by_id[f"r{i}"]
        assert len(r.token_times_s) == arrival.output_len == r.output_len
        assert r.token_times_s == sorted(r.token_times_s) and r.token_times_s[0] > r.arrival_s


def test_the_router_ends_with_no_charges_left():
    sim = Simulator(design(num_prompt=2, num_token=2, kv_blocks=500), FakeLatency())
    sim.run(poisson_arrivals(30, 3, (100, 2000), (1, 40), seed=1))
    for m in sim.pools.machines.values():
        assert (m.pending_prompt_tokens, m.prompt_queue_len, m.pending_decode_tokens) == (0, 0, 0)
        assert m.kv_blocks_free == m.kv_blocks_total and m.role == m.home
    for m in sim.machines.values():
        assert m.sched.budget.used == 0 and not m.busy


def test_more_load_gives_higher_latency_percentiles():
    d = design(num_prompt=1, num_token=1, kv_blocks=4000)
    low = simulate(d, poisson_arrivals(2, 20, 500, 20, seed=7))
    high = simulate(d, poisson_arrivals(30, 20, 500, 20, seed=7))
    for p in (50, 90, 99):
        assert high.ttft_s(p) > low.ttft_s(p)
        assert high.e2e_s(p) > low.e2e_s(p)
    assert high.tbt_s(90) > low.tbt_s(90)  # bigger decode batches


def test_no_token_machine_runs_colocated_through_the_routers_fallback():
    arrivals = poisson_arrivals(5, 4, 300, 10, seed=2)
    result = simulate(design(num_prompt=1, num_token=0), arrivals)
    assert len(result.finished) == len(arrivals)
    assert all(r.colocated and r.prompt_machine == "prompt-0" for r in result.requests)
    assert result.borrow_events  # the prompt machine was borrowed for token work
    r = result.requests[0]  # alone at first: no KV transfer, the prefill's token is the first
    assert r.ttft_s == pytest.approx(0.010 + 0.001 * 300)


def test_a_prompt_queue_past_the_limit_borrows_a_token_machine():
    burst = [Arrival(0.0, 800, 4) for _ in range(4)]
    result = simulate(design(prompt_queue_limit_tokens=1000), burst)
    assert len(result.finished) == 4
    moves = [move for _, move in result.borrow_events]
    assert any(m.machine_id == "token-0" and m.to_pool == "mixed" for m in moves)
    assert [r.prompt_machine for r in result.requests][:2] == ["prompt-0", "token-0"]
    # The same burst under the default limit stays on the prompt machine.
    calm = simulate(design(), burst)
    assert not calm.borrow_events and {r.prompt_machine for r in calm.requests} == {"prompt-0"}


def test_memory_short_token_machine_queues_instead_of_failing():
    # Each request needs 2 blocks (32 tokens) of a machine's 4: the token machine holds two, the
    # router borrows the prompt machine for two more (colocated), and the fifth waits in line.
    result = simulate(design(kv_blocks=4), [Arrival(0.0, 20, 10) for _ in range(5)])
    assert len(result.finished) == 5 and not result.rejected
    r = result.requests
    assert [x.colocated for x in r] == [False, False, True, True, False]
    assert r[4].token_machine == "token-0"
    assert r[4].token_times_s[0] > min(r[0].finish_s, r[1].finish_s)  # admitted after a release


def test_a_request_larger_than_any_machine_is_rejected():
    result = simulate(design(kv_blocks=2), [Arrival(0.0, 100, 10), Arrival(0.1, 10, 2)])
    assert result.rejected == ["r0"] and len(result.finished) == 1


def test_realistic_run_on_the_profile(profile):
    arrivals = poisson_arrivals(4, 10, (200, 4000), (10, 200), seed=5)
    d = design(num_prompt=2, num_token=1, kv_blocks=20000, model_shape=LLAMA, tensor_parallel=8)
    result = simulate(d, arrivals, profile)
    assert len(result.finished) == len(arrivals)
    assert 0 < result.ttft_s(50) <= result.ttft_s(90) <= result.ttft_s(99)
    assert result.tbt_s(50) >= profile.decode_s(1, 200)


def test_colocated_design_runs_each_request_on_one_machine_by_jsq():
    arrivals = poisson_arrivals(8, 10, (100, 1500), (5, 50), seed=9)
    d = design(num_prompt=0, num_token=3, kv_blocks=3000, colocated=True)
    sim = Simulator(d, FakeLatency())
    result = sim.run(arrivals)
    assert len(result.finished) == len(arrivals) and not result.pool_events
    assert all(r.colocated for r in result.requests)
    assert len({r.token_machine for r in result.requests}) == 3  # the load spread over all three
    assert all(m.role == m.home and m.pending_decode_tokens == 0 for m in sim.pools.machines.values())
    r0 = result.requests[0]  # first and alone: the prefill's token comes with no transfer
    assert r0.ttft_s == pytest.approx(0.010 + 0.001 * r0.prompt_len)


class MixedFakeLatency(FakeLatency):
    def _mixed_s(self, prefill_tokens, num_prefills, num_decodes, decode_context_tokens):
        return 0.010 + 0.001 * (prefill_tokens + num_decodes)


def test_chunked_colocated_design_keeps_decodes_going_through_a_long_prompt():
    # One long-running decode, then a 3000-token prompt: prompt-first stalls the decode for the
    # whole prefill (3.01 s), chunked prefill (budget 512) interleaves it in ~0.5 s steps.
    arrivals = [Arrival(0.0, 50, 200), Arrival(0.5, 3000, 3)]
    runs = {}
    for policy in ("prompt_first", "chunked"):
        d = design(num_prompt=0, num_token=1, kv_blocks=4000, colocated=True, mixed_policy=policy,
                   max_num_batched_tokens=512)
        runs[policy] = simulate(d, arrivals, MixedFakeLatency())
        assert len(runs[policy].finished) == 2
    first = {p: r.requests[0] for p, r in runs.items()}
    # the stalled gap: the whole prefill, then the next decode step (of both requests)
    assert max(first["prompt_first"].tbts_s) == pytest.approx(0.010 + 0.001 * 3000 + 0.021)
    assert max(first["chunked"].tbts_s) <= 0.010 + 0.001 * 512 + 1e-9  # a step never exceeds the budget
    long = runs["chunked"].requests[1]
    assert long.token_times_s[0] > long.arrival_s + 5 * 0.010  # it took several chunked steps


def test_an_uncontended_request_on_the_reference_machine_has_slowdown_one(profile):
    a100 = ProfileLatencyModel.from_csv(PROFILE, model="llama2-70b", hardware="a100-80gb",
                                        tensor_parallel=8)
    d = design(num_prompt=0, num_token=1, kv_blocks=20000, colocated=True)
    result = Simulator(d, a100, keep_token_times=False).run([Arrival(0.0, 1500, 40)])
    report = SloReport.of(result, Reference(a100), SPLITWISE_SLO)
    for key, value in report.values.items():
        assert value == pytest.approx(1.0, rel=0.01), key
    assert report.all_met and report.num_met == 9 and report.worst_ratio == pytest.approx(1 / 1.25, rel=0.01)


def test_slo_targets_parse_and_goodput_is_the_highest_rate_meeting_all():
    assert parse_slo(None) == SPLITWISE_SLO
    assert parse_slo("ttft_p99=4, tbt_p50=2")["ttft_p99"] == 4.0
    for bad, message in (("ttft_p98=3", "unknown SLO key"), ("ttft_p99", "KEY=SLOWDOWN"),
                         ("e2e_p50=x", "not a number"), ("e2e_p50=0", "must be > 0")):
        with pytest.raises(SloError, match=message):
            parse_slo(bad)
    ok = SloReport(dict.fromkeys(SPLITWISE_SLO, 1.0), SPLITWISE_SLO)
    slow = SloReport({**dict.fromkeys(SPLITWISE_SLO, 1.0), "tbt_p99": 5.5}, SPLITWISE_SLO)
    assert not slow.all_met and slow.num_met == 8 and slow.met["tbt_p99"] is False
    assert goodput_rate([(10, ok), (20, ok), (30, slow)]) == 20
    assert goodput_rate([(10, slow)]) is None
    nothing = SloReport(dict.fromkeys(SPLITWISE_SLO, float("nan")), SPLITWISE_SLO)
    assert nothing.num_met == 0  # no finished request never meets a target


def test_synthetic_gamma_arrivals_are_seeded_and_burstiness_changes_the_spread():
    lengths = [(100, 5), (2000, 50)]
    a = gamma_arrivals(50, 40, lengths, None, burstiness=0.25, seed=3)
    assert a == gamma_arrivals(50, 40, lengths, None, burstiness=0.25, seed=3)
    assert {(x.prompt_len, x.output_len) for x in a} == set(lengths)
    smooth = gamma_arrivals(50, 40, 10, 5, burstiness=4.0, seed=3)
    for arr in (a, smooth):
        assert len(arr) / 40 == pytest.approx(50, rel=0.15)

    def gap_cv(arr):
        gaps = [y.arrival_s - x.arrival_s for x, y in zip(arr, arr[1:])]
        mean = sum(gaps) / len(gaps)
        return (sum((g - mean) ** 2 for g in gaps) / len(gaps)) ** 0.5 / mean
    assert gap_cv(a) > 1.5 > 0.8 > gap_cv(smooth)  # cv = 1 / sqrt(shape): 2 and 0.5
    with pytest.raises(ValueError, match="burstiness"):
        gamma_arrivals(5, 1, 10, 5, burstiness=0)


def test_simulated_results_are_deterministic_for_a_seed_at_scale(profile):
    arrivals = gamma_arrivals(40, 20, (100, 4000), (1, 300), burstiness=0.5, seed=12)
    d = design(num_prompt=3, num_token=2, kv_blocks=4000, model_shape=LLAMA, tensor_parallel=8)
    runs = [Simulator(d, profile, seed=5, keep_token_times=False).run(arrivals) for _ in range(2)]
    assert runs[0].summary() == runs[1].summary()
    assert runs[0].pool_events == runs[1].pool_events and list(runs[0].tbt_gaps_s) == list(runs[1].tbt_gaps_s)
    assert [(r.prompt_machine, r.token_machine, r.finish_s) for r in runs[0].requests] == \
        [(r.prompt_machine, r.token_machine, r.finish_s) for r in runs[1].requests]


def test_percentile_interpolates_between_ranks():
    assert percentile([1.0, 2.0, 3.0, 4.0], 50) == 2.5
    assert percentile([5.0], 99) == 5.0


# -- traces ---------------------------------------------------------------------------------------

def test_azure_loader_parses_the_first_rows():
    arrivals = load_azure_trace(need_trace(CODE_TRACE), limit=50)
    assert len(arrivals) == 50
    assert arrivals[0] == Arrival(0.0, 4808, 10)
    assert arrivals[1].arrival_s == pytest.approx(0.052) and arrivals[1].prompt_len == 3180
    assert all(b.arrival_s >= a.arrival_s for a, b in zip(arrivals, arrivals[1:]))


def test_azure_loader_rescales_to_a_rate_then_cuts_to_a_duration():
    trace = need_trace(CONV_TRACE)
    scaled = load_azure_trace(trace, limit=1000, rate=70)
    assert (len(scaled) - 1) / scaled[-1].arrival_s == pytest.approx(70)
    cut = load_azure_trace(trace, limit=1000, rate=70, duration_s=5)
    assert cut == [a for a in scaled if a.arrival_s < 5] and 200 < len(cut) < 500


def test_azure_loader_rate_scale_multiplies_the_traces_own_rate():
    trace = need_trace(CODE_TRACE)
    native = load_azure_trace(trace, limit=300)
    doubled = load_azure_trace(trace, limit=300, rate_scale=2.0)
    assert [a.arrival_s for a in doubled] == pytest.approx([a.arrival_s / 2 for a in native])
    assert [(a.prompt_len, a.output_len) for a in doubled] == [(a.prompt_len, a.output_len) for a in native]
    with pytest.raises(TraceError, match="rate or rate_scale, not both"):
        load_azure_trace(trace, limit=10, rate=5, rate_scale=2)
    with pytest.raises(TraceError, match="rate_scale must be > 0"):
        load_azure_trace(trace, limit=10, rate_scale=0)


def test_azure_loader_errors_name_the_file_and_column(tmp_path):
    bad = tmp_path / "t.csv"
    bad.write_text("TIMESTAMP,ContextTokens\n2023-11-16 18:17:03.9,5\n")
    with pytest.raises(TraceError, match=r"t\.csv lacks column\(s\) GeneratedTokens"):
        load_azure_trace(bad)
    bad.write_text("TIMESTAMP,ContextTokens,GeneratedTokens\n2023-11-16 18:17:03.9,5,x\n")
    with pytest.raises(TraceError, match=r"t\.csv line 2: column GeneratedTokens"):
        load_azure_trace(bad)
    with pytest.raises(TraceError, match="cannot read trace .*missing.csv"):
        load_azure_trace(tmp_path / "missing.csv")


def test_poisson_arrivals_are_deterministic_for_a_seed():
    a = poisson_arrivals(10, 30, (1, 100), 7, seed=1)
    assert a == poisson_arrivals(10, 30, (1, 100), 7, seed=1) != poisson_arrivals(10, 30, (1, 100), 7, seed=2)
    assert 200 < len(a) < 400 and all(1 <= x.prompt_len <= 100 and x.output_len == 7 for x in a)


def test_clsctl_simulate_runs_a_design_over_a_trace(tmp_path):
    trace = SHARED / "traces" / "AzureLLMInferenceTrace_conv.csv"
    profile = SHARED / "profiles" / "splitwise_perf_model.csv"
    if not (trace.is_file() and profile.is_file()):
        pytest.skip(f"needs {trace} and {profile} (../shared beside the repository)")
    design = tmp_path / "design.yaml"
    design.write_text(f"name: t\nnum_prompt: 2\nnum_token: 2\nprofile: {profile}\n")
    out = tmp_path / "sim.json"
    root = Path(__file__).resolve().parents[2]
    run = subprocess.run([sys.executable, "-m", "cls.cli.clsctl", "simulate", "--cluster", str(design),
                          "--trace", str(trace), "--limit", "200", "--rate", "5", "--json", str(out)],
                         cwd=root, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    (report,) = json.loads(out.read_text())["designs"]["t"]["runs"]
    assert report["num_finished"] == 200 and report["num_rejected"] == 0
    assert 0 < report["ttft_p50_s"] <= report["ttft_p99_s"] and "SLO targets met:" in run.stdout
    assert set(report["slo"]["slowdown"]) == set(SPLITWISE_SLO) and "200/200" in run.stderr
    design.write_text("name: t\nnum_prompt: 2\nnum_tokens: 2\n")
    bad = subprocess.run([sys.executable, "-m", "cls.cli.clsctl", "simulate", "--cluster", str(design),
                          "--trace", str(trace)], cwd=root, capture_output=True, text=True, timeout=60)
    assert bad.returncode == 1 and "unknown key num_tokens" in bad.stderr


def test_clsctl_simulate_sweeps_two_designs_and_writes_goodput_plots_and_json(tmp_path):
    profile = SHARED / "profiles" / "splitwise_perf_model.csv"
    if not profile.is_file():
        pytest.skip(f"needs {profile} (../shared beside the repository)")
    split, coloc = tmp_path / "split.yaml", tmp_path / "coloc.yaml"
    split.write_text(f"name: split\nnum_prompt: 1\nnum_token: 1\nprofile: {profile}\n")
    coloc.write_text(f"name: coloc\ncolocated: true\nnum_prompt: 0\nnum_token: 2\nprofile: {profile}\n")
    out, plots = tmp_path / "sweep.json", tmp_path / "plots"
    cmd = [sys.executable, "-m", "cls.cli.clsctl", "simulate", "--cluster", str(split), "--cluster", str(coloc),
           "--duration", "30", "--sweep", "0.2,1,40", "--prompt-len", "200:2000", "--output-len", "20:200",
           "--seed", "4", "--json", str(out), "--plots", str(plots), "--no-progress"]
    run = subprocess.run(cmd, cwd=Path(__file__).resolve().parents[2], capture_output=True, text=True,
                         timeout=120)
    assert run.returncode == 0, run.stderr
    doc = json.loads(out.read_text())
    for name in ("split", "coloc"):
        runs = doc["designs"][name]["runs"]
        assert [r["rate"] for r in runs] == [0.2, 1, 40]
        met = [r["slo"]["all_met"] for r in runs]
        goodput = doc["designs"][name]["goodput_rate"]
        assert goodput == max((r["rate"] for r, m in zip(runs, met) if m), default=None)
        assert runs[0]["slo"]["all_met"] and not runs[-1]["slo"]["all_met"]  # idle vs overloaded
    a, b = doc["designs"]["split"]["goodput_rate"], doc["designs"]["coloc"]["goodput_rate"]
    assert doc["goodput_ratios"]["split/coloc"] == pytest.approx(a / b)
    assert "goodput ratio split / coloc" in run.stdout
    for png in ("ttft_cdf", "tbt_cdf", "e2e_cdf", "slo_vs_rate", "pools_split", "pools_coloc"):
        assert (plots / f"{png}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert doc["designs"]["coloc"]["runs"][-1]["num_pool_moves"] == 0  # colocated never borrows
    split_run = doc["designs"]["split"]["runs"][-1]  # overloaded: the pair borrows each other
    assert len(split_run["pool_moves"]) == split_run["num_pool_moves"] > 0
    assert all(to in ("mixed", "prompt", "token") for _, _, _, to in split_run["pool_moves"])
    assert set(split_run["busy_s"]) == {"prompt-0", "token-0"}
    bad = subprocess.run(cmd[:6] + ["--sweep", "1,-2"], capture_output=True, text=True, timeout=60,
                         cwd=Path(__file__).resolve().parents[2])
    assert bad.returncode == 2 and "rates must be > 0" in bad.stderr


def test_a_renamed_design_key_still_loads_with_a_warning_naming_the_new_key(tmp_path):
    from cls.sim.design import SimDesignConfig

    path = tmp_path / "d.yaml"
    path.write_text("name: d\nnum_prompt: 1\nnum_token: 1\nprofile: null\nmax_batch_size: 7\n")
    with pytest.warns(DeprecationWarning, match="max_batch_size is deprecated; use max_num_seqs"):
        cfg = SimDesignConfig.load(path)
    assert cfg.max_num_seqs == 7 and cfg.build()[0].max_num_seqs == 7
    path.write_text("name: d\nnum_prompt: 1\nnum_token: 1\nmax_batch_size: 7\nmax_num_seqs: 8\n")
    with pytest.raises(Exception, match="max_batch_size and max_num_seqs both given"), \
            pytest.warns(DeprecationWarning):
        SimDesignConfig.load(path)
