"""The SDK (cls/client/) against an in-process fake clsd on a real port, and `LocalCluster`
(cls/cli/local_cluster.py) against stand-in daemon processes.

`FakeClsd` serves ClientService, AdminService and RegistryService with canned behaviour:
- Generate: "" -> INVALID_ARGUMENT; "abort:CODE" -> that status; "hang" -> one delta, then waits
  until the client goes away (recorded, see `wait_cancelled`); anything else streams the answer
  "Paris is the capital." in four deltas (cut to `max_tokens`, finish "length").
- Admin RPCs need `authorization: Bearer <token>` (UNAUTHENTICATED otherwise).

Run as a module (`python -m tests.e2e.test_client_sdk clsd|mlsd --config X --set K=V ...`) it plays a
daemon for LocalCluster: prints a READY line, registers machines, stops on SIGTERM and logs the
monotonic time it stopped (to check the stop order).
"""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import signal
import socket
import stat
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import pytest
import yaml

from cls.cli import local_cluster
from cls.client import (
    AsyncClsClient,
    Cancelled,
    ClsClient,
    ClsError,
    DeadlineExceeded,
    FailedPrecondition,
    Internal,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    ResourceExhausted,
    Unauthenticated,
    Unavailable,
)
from proto import clsd_pb2 as pb
from proto import clsd_pb2_grpc
from proto import mlsd_pb2 as mpb

ROOT = Path(__file__).resolve().parents[2]
TOKEN = "fake-admin-token"
ANSWER = [("Paris", 100), (" is", 101), (" the", 102), (" capital.", 103)]


def _machine(mid: str, home: int, role: int, address: str = "") -> pb.MachineStatus:
    return pb.MachineStatus(machine_id=mid, address=address or f"10.0.0.{len(mid)}:50061",
                            home=home, role=role, pending_prompt_tokens=12,
                            pending_decode_tokens=340, kv_blocks_free=900, kv_blocks_total=1024,
                            num_requests=3, lease_expires_in_s=7.5)


def canned_machines() -> dict[str, pb.MachineStatus]:
    return {m.machine_id: m for m in (_machine("prompt-0", mpb.PROMPT, mpb.PROMPT),
                                      _machine("token-0", mpb.TOKEN, mpb.TOKEN),
                                      _machine("spare-0", mpb.TOKEN, mpb.MIXED))}


class FakeClsd(clsd_pb2_grpc.ClientServiceServicer, clsd_pb2_grpc.AdminServiceServicer,
               clsd_pb2_grpc.RegistryServiceServicer):
    def __init__(self, token: str = TOKEN, machines: dict | None = None, port: int = 0):
        self.token = token
        self.machines = canned_machines() if machines is None else machines
        self.requests: list[pb.GenerateRequest] = []
        self._ended: set[str] = set()  # "hang" requests whose RPC ended while they waited
        self._cv = threading.Condition()
        self._ids = itertools.count()
        self.server = grpc.server(ThreadPoolExecutor(max_workers=8))
        clsd_pb2_grpc.add_ClientServiceServicer_to_server(self, self.server)
        clsd_pb2_grpc.add_AdminServiceServicer_to_server(self, self.server)
        clsd_pb2_grpc.add_RegistryServiceServicer_to_server(self, self.server)
        self.port = self.server.add_insecure_port(f"127.0.0.1:{port}")

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def __enter__(self) -> FakeClsd:
        self.server.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.stop(grace=None).wait(10)

    def wait_cancelled(self, request_id: str, timeout_s: float = 10.0) -> bool:
        with self._cv:
            return self._cv.wait_for(lambda: request_id in self._ended, timeout_s)

    # --- ClientService
    def Generate(self, request, context):
        self.requests.append(request)
        rid = request.request_id or f"fake-{next(self._ids)}"
        text = request.prompt.decode()
        if not text and not request.prompt_token_ids:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "the prompt is empty")
        if text.startswith("abort:"):
            code = grpc.StatusCode[text.split(":", 1)[1]]
            context.abort(code, f"fake clsd says {code.name}")
        num_prompt = len(request.prompt_token_ids) or len(text.split())
        if text == "hang":
            # Recorded from the termination callback: once the client has gone, the server may
            # never resume this generator.
            ended = threading.Event()

            def on_end() -> None:
                with self._cv:
                    self._ended.add(rid)
                    self._cv.notify_all()
                ended.set()

            context.add_callback(on_end)
            yield pb.GenerateResponse(request_id=rid, index=0, token_ids=[7], text="...",
                                      num_prompt_tokens=num_prompt)
            ended.wait(30)
            return
        pieces = ANSWER[:request.max_tokens] if request.max_tokens else ANSWER
        finish = "length" if len(pieces) < len(ANSWER) else "stop"
        for i, (piece, token) in enumerate(pieces):
            last = i == len(pieces) - 1
            msg = pb.GenerateResponse(request_id=rid, index=i, token_ids=[token], text=piece,
                                      num_prompt_tokens=num_prompt if i == 0 else 0)
            if last:
                msg.finish_reason = finish
                msg.timing.CopyFrom(pb.Timing(ttft_s=0.05, e2e_s=0.2, tpot_s=0.05,
                                              max_tbt_s=0.07, queue_s=0.01))
                msg.prompt_machine, msg.token_machine = "prompt-0", "token-0"
            yield msg

    # --- AdminService
    def _auth(self, context) -> None:
        md = dict(context.invocation_metadata())
        if md.get("authorization") != f"Bearer {self.token}":
            context.abort(grpc.StatusCode.UNAUTHENTICATED, "missing or wrong admin token")

    def ListMachines(self, request, context):
        self._auth(context)
        return pb.ListMachinesReply(machines=list(self.machines.values()))

    def ListPools(self, request, context):
        self._auth(context)
        pools = []
        for role in (mpb.PROMPT, mpb.TOKEN, mpb.MIXED):
            ms = [m for m in self.machines.values() if m.role == role]
            pools.append(pb.PoolStatus(role=role, machine_ids=[m.machine_id for m in ms],
                                       pending_tokens=sum(m.pending_prompt_tokens for m in ms)))
        return pb.ListPoolsReply(pools=pools, num_borrowed=4, num_returned=3)

    def ResizePools(self, request, context):
        self._auth(context)
        n = len(self.machines)
        num_prompt = request.num_prompt if request.HasField("num_prompt") else n - request.num_token
        if num_prompt > n or (request.HasField("num_token") and num_prompt + request.num_token != n):
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"the pools must add up to {n} machines")
        moves = []
        homes = [m for m in self.machines.values() if m.home == mpb.PROMPT]
        for m in self.machines.values():
            if m.home == mpb.TOKEN and len(homes) < num_prompt:
                moves.append(pb.PoolMove(machine_id=m.machine_id, from_pool=mpb.TOKEN, to_pool=mpb.PROMPT))
                homes.append(m)
        return pb.ResizePoolsReply(moves=moves)

    def _drain(self, request, context, draining: bool):
        self._auth(context)
        m = self.machines.get(request.machine_id)
        if m is None:
            context.abort(grpc.StatusCode.NOT_FOUND, f"no machine {request.machine_id!r}")
        if m.draining == draining:
            context.abort(grpc.StatusCode.FAILED_PRECONDITION,
                          f"{request.machine_id} is {'already' if draining else 'not'} draining")
        m.draining = draining
        return pb.DrainReply(machine=m)

    def DrainMachine(self, request, context):
        return self._drain(request, context, True)

    def UndrainMachine(self, request, context):
        return self._drain(request, context, False)

    # --- RegistryService
    def Register(self, request, context):
        info = request.info
        self.machines[info.machine_id] = _machine(info.machine_id, info.role, info.role, request.address)
        return pb.RegisterReply(lease_id=info.machine_id, lease_ttl_s=10, heartbeat_interval_s=1)


@pytest.fixture
def fake():
    with FakeClsd() as f:
        yield f


# --- generate -------------------------------------------------------------------------------


def test_generate_collects_the_stream(fake):
    with ClsClient(fake.address) as client:
        done = client.generate("What is the capital of France?", chat=True, seed=3, temperature=0.5,
                               top_k=20, top_p=0.9, stop_token_ids=[2], request_id="r1")
    assert done.text == "Paris is the capital." and done.token_ids == (100, 101, 102, 103)
    assert (done.request_id, done.finish_reason, done.num_prompt_tokens) == ("r1", "stop", 6)
    assert (done.prompt_machine, done.token_machine, done.num_reroutes) == ("prompt-0", "token-0", 0)
    assert done.timing.ttft_s == pytest.approx(0.05) and done.timing.max_tbt_s == pytest.approx(0.07)
    req = fake.requests[-1]
    assert req.prompt == b"What is the capital of France?" and not req.prompt_token_ids
    assert req.apply_chat_template and req.HasField("seed") and req.seed == 3
    assert (req.top_k, list(req.stop_token_ids)) == (20, [2])


def test_generate_stream_token_ids_and_defaults(fake):
    with ClsClient(fake.address) as client:
        deltas = list(client.generate_stream([5, 6, 7], max_tokens=2))
    assert [d.index for d in deltas] == [0, 1] and deltas[-1].finish_reason == "length"
    assert deltas[0].num_prompt_tokens == 3 and deltas[0].timing is None
    assert deltas[-1].timing is not None
    req = fake.requests[-1]
    assert list(req.prompt_token_ids) == [5, 6, 7] and not req.prompt and not req.HasField("seed")
    assert (req.max_tokens, req.temperature, req.top_p, req.apply_chat_template) == (2, 0.0, 1.0, False)


def test_async_generate_and_stream(fake):
    async def main():
        async with AsyncClsClient(fake.address) as client:
            done = await client.generate("Hi there", max_tokens=3)
            texts = [d.text async for d in client.generate_stream("Hi")]
            return done, texts

    done, texts = asyncio.run(main())
    assert done.text == "Paris is the" and done.finish_reason == "length"
    assert "".join(texts) == "Paris is the capital."


def test_address_from_environment(fake, monkeypatch):
    monkeypatch.setenv("CLSD_ADDRESS", fake.address)
    with ClsClient() as client:
        assert client.address == fake.address
        assert client.generate("x").finish_reason == "stop"


# --- errors ---------------------------------------------------------------------------------


@pytest.mark.parametrize("code, cls_error", [
    (grpc.StatusCode.INVALID_ARGUMENT, InvalidArgument), (grpc.StatusCode.NOT_FOUND, NotFound),
    (grpc.StatusCode.RESOURCE_EXHAUSTED, ResourceExhausted),
    (grpc.StatusCode.UNAUTHENTICATED, Unauthenticated),
    (grpc.StatusCode.PERMISSION_DENIED, PermissionDenied),
    (grpc.StatusCode.FAILED_PRECONDITION, FailedPrecondition),
    (grpc.StatusCode.UNAVAILABLE, Unavailable), (grpc.StatusCode.DEADLINE_EXCEEDED, DeadlineExceeded),
    (grpc.StatusCode.CANCELLED, Cancelled), (grpc.StatusCode.INTERNAL, Internal)], ids=lambda v: getattr(v, "name", ""))
def test_each_status_is_a_typed_error(fake, code, cls_error):
    with ClsClient(fake.address) as client, pytest.raises(cls_error) as err:
        client.generate(f"abort:{code.name}")
    assert err.value.code == code and str(err.value) == f"fake clsd says {code.name}"


def test_other_status_is_the_base_error(fake):
    with ClsClient(fake.address) as client, pytest.raises(ClsError) as err:
        client.generate("abort:DATA_LOSS")
    assert type(err.value) is ClsError and err.value.code == grpc.StatusCode.DATA_LOSS


def test_empty_prompt_is_invalid_argument(fake):
    async def main():
        async with AsyncClsClient(fake.address) as client:
            await client.generate("")

    with pytest.raises(InvalidArgument, match="the prompt is empty"):
        asyncio.run(main())
    with ClsClient(fake.address) as client, pytest.raises(InvalidArgument, match="the prompt is empty"):
        client.generate([])


def test_deadline_and_unreachable_server(fake):
    with ClsClient(fake.address) as client, pytest.raises(DeadlineExceeded):
        client.generate("hang", timeout_s=0.3)
    with socket.socket() as s:  # a port nobody listens on once closed
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with ClsClient(f"127.0.0.1:{port}") as client, pytest.raises(Unavailable):
        client.list_machines(timeout_s=5)


# --- cancellation ---------------------------------------------------------------------------


def test_breaking_out_of_the_sync_stream_cancels_the_rpc(fake):
    with ClsClient(fake.address) as client:
        for delta in client.generate_stream("hang", request_id="brk"):
            assert delta.text == "..."
            break
        assert fake.wait_cancelled("brk")


def test_cancel_and_context_exit_cancel_the_rpc(fake):
    with ClsClient(fake.address) as client:
        stream = client.generate_stream("hang", request_id="cnl")
        next(stream)
        stream.cancel()
        assert fake.wait_cancelled("cnl")
        with pytest.raises(Cancelled):
            next(stream)
        with client.generate_stream("hang", request_id="ctx") as stream:
            next(stream)
        assert fake.wait_cancelled("ctx")


def test_async_task_cancellation_and_aclose_cancel_the_rpc(fake):
    async def main():
        async with AsyncClsClient(fake.address) as client:
            got = asyncio.Event()

            async def consume():
                async for _ in client.generate_stream("hang", request_id="task"):
                    got.set()

            task = asyncio.create_task(consume())
            await got.wait()
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            stream = client.generate_stream("hang", request_id="acl")
            await stream.__anext__()
            await stream.aclose()
            with pytest.raises(Cancelled):
                await stream.__anext__()
            return await asyncio.to_thread(lambda: [fake.wait_cancelled(r) for r in ("task", "acl")])

    assert asyncio.run(main()) == [True, True]


# --- admin ----------------------------------------------------------------------------------


def test_admin_calls_with_a_token(fake):
    with ClsClient(fake.address, admin_token=TOKEN) as client:
        machines = client.list_machines()
        assert [(m.machine_id, m.home, m.role) for m in machines] == [
            ("prompt-0", "prompt", "prompt"), ("token-0", "token", "token"), ("spare-0", "token", "mixed")]
        assert machines[0].kv_blocks_total == 1024 and machines[0].lease_expires_in_s == 7.5
        pools = client.list_pools()
        assert [(p.role, p.machine_ids) for p in pools.pools] == [
            ("prompt", ("prompt-0",)), ("token", ("token-0",)), ("mixed", ("spare-0",))]
        assert (pools.num_borrowed, pools.num_returned) == (4, 3)
        moves = client.resize_pools(num_prompt=2)
        assert [(m.machine_id, m.from_pool, m.to_pool) for m in moves] == [("token-0", "token", "prompt")]
        with pytest.raises(InvalidArgument, match="add up to 3"):
            client.resize_pools(num_prompt=2, num_token=2)
        assert client.drain("token-0").draining is True
        with pytest.raises(FailedPrecondition, match="already draining"):
            client.drain("token-0")
        assert client.undrain("token-0").draining is False
        with pytest.raises(NotFound, match="no machine 'nope'"):
            client.drain("nope")


def test_async_admin_with_a_token_file(fake, tmp_path):
    path = tmp_path / "token"
    path.write_text(f"  {TOKEN}\n")

    async def main():
        async with AsyncClsClient(fake.address, admin_token_file=path) as client:
            return await client.list_machines(), await client.drain("spare-0")

    machines, drained = asyncio.run(main())
    assert len(machines) == 3 and drained.machine_id == "spare-0" and drained.role == "mixed"


def test_admin_calls_without_or_with_a_wrong_token(fake, tmp_path):
    with ClsClient(fake.address) as client, pytest.raises(Unauthenticated, match="admin token"):
        client.list_pools()
    with ClsClient(fake.address, admin_token="wrong") as client, pytest.raises(Unauthenticated):
        client.list_machines()
    missing = tmp_path / "absent"
    with ClsClient(fake.address, admin_token_file=missing) as client:
        with pytest.raises(Unauthenticated, match=f"{missing} does not exist"):
            client.list_machines()
        assert client.generate("no token needed").finish_reason == "stop"
    empty = tmp_path / "empty"
    empty.write_text("\n")
    with ClsClient(fake.address, admin_token_file=empty) as client:
        with pytest.raises(Unauthenticated, match=f"{empty} is empty"):
            client.resize_pools(num_token=1)


def test_sdk_imports_no_torch():
    code = "import sys, cls.client, cls.cli.local_cluster; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=ROOT, timeout=60)
    assert out.stdout.strip() == "False"


# --- LocalCluster with stand-in daemons -----------------------------------------------------

STAND_IN = [sys.executable, "-m", "tests.e2e.test_client_sdk"]


def write_local_config(tmp_path: Path, machines: list[dict]) -> Path:
    """configs/local.yaml's format, pointing at stand-in configs in tmp_path."""
    return local_cluster.write_local_config(tmp_path, {"grpc_port": 0}, machines)


def stopped_at(log: Path) -> int:
    return int(log.read_text().split("stopped at ")[1].split()[0])


def test_local_cluster_starts_registers_and_stops_in_order(tmp_path):
    cfg = local_cluster.LocalConfig.load(write_local_config(tmp_path, [
        {"machine_id": "prompt-0", "role": "prompt"}, {"machine_id": "token-0", "role": "token"}]))
    cluster = local_cluster.LocalCluster(cfg, clsd_argv=[*STAND_IN, "clsd"], mlsd_argv=[*STAND_IN, "mlsd"],
                                 env=dict(os.environ, PYTHONPATH=str(ROOT)), ready_timeout_s=60)
    with cluster:
        token = cluster.token_file
        assert stat.S_IMODE(token.stat().st_mode) == 0o600 and len(token.read_text().strip()) == 64
        assert sorted(m.machine_id for m in cluster.registered) == ["prompt-0", "token-0"]
        with cluster.client() as client:
            assert client.generate("hello").text == "Paris is the capital."
            assert {m.role for m in client.list_machines()} == {"prompt", "token"}
    codes = cluster.stop()
    assert codes == {"prompt-0": 0, "token-0": 0, "clsd": 0}
    run = cfg.run_dir
    assert max(stopped_at(run / "prompt-0.log"), stopped_at(run / "token-0.log")) < stopped_at(run / "clsd.log")


def test_local_cluster_failure_stops_what_was_started(tmp_path):
    cfg = local_cluster.LocalConfig.load(write_local_config(tmp_path, [
        {"machine_id": "prompt-0", "role": "prompt"}, {"machine_id": "broken-0", "role": "token", "fail": True}]))
    cluster = local_cluster.LocalCluster(cfg, clsd_argv=[*STAND_IN, "clsd"], mlsd_argv=[*STAND_IN, "mlsd"],
                                 env=dict(os.environ, PYTHONPATH=str(ROOT)), ready_timeout_s=60)
    with pytest.raises(local_cluster.LocalClusterError, match="broken-0 exited with code 4(.|\n)*model not found"):
        cluster.start()
    assert all(d.proc.poll() is not None for d in (cluster.clsd, *cluster.machines))
    assert "stopped at" in (cfg.run_dir / "clsd.log").read_text()


def test_local_config_errors_name_the_key(tmp_path):
    bad = tmp_path / "local.yaml"
    bad.write_text("clsd: x.yaml\nmachines: []\n")
    with pytest.raises(local_cluster.LocalClusterError, match="'machines' must be a non-empty list"):
        local_cluster.LocalConfig.load(bad)
    bad.write_text("clsd: x.yaml\nmachines: [a.yaml]\nrundir: .run\n")
    with pytest.raises(local_cluster.LocalClusterError, match="unknown key 'rundir'"):
        local_cluster.LocalConfig.load(bad)
    bad.write_text(f"clsd: {tmp_path}/nope.yaml\nmachines: [a.yaml]\n")
    with pytest.raises(local_cluster.LocalClusterError, match="nope.yaml does not exist"):
        local_cluster.LocalConfig.load(bad)


# --- stand-in daemons (python -m tests.e2e.test_client_sdk clsd|mlsd ...) ------------------------


def _wait(stop: threading.Event) -> None:
    # Timed: a signal may land on one of grpc's threads, and the main thread runs the Python
    # handler only when it wakes up; an untimed wait could then sleep through SIGTERM.
    while not stop.wait(0.5):
        pass


def _stand_in(argv: list[str]) -> int:
    kind, args = argv[0], argv[1:]
    cfg = yaml.safe_load(Path(args[args.index("--config") + 1]).read_text()) or {}
    for i, a in enumerate(args):
        if a == "--set":
            key, _, value = args[i + 1].partition("=")
            cfg[key] = yaml.safe_load(value)
    stop = threading.Event()
    for s in (signal.SIGTERM, signal.SIGINT):
        signal.signal(s, lambda *_: stop.set())
    if kind == "clsd":
        token = Path(cfg["admin_token_file"]).read_text().strip()
        with FakeClsd(token=token, machines={}, port=cfg.get("grpc_port", 0)) as server:
            print(json.dumps({"event": "READY", "grpc_port": server.port, "metrics_port": 0}), flush=True)
            _wait(stop)
    else:
        if cfg.get("fail"):
            print("fake mlsd: model not found", file=sys.stderr)
            return 4
        role = {"prompt": mpb.PROMPT, "token": mpb.TOKEN}[cfg["role"]]
        with grpc.insecure_channel(cfg["cls_address"]) as ch:
            clsd_pb2_grpc.RegistryServiceStub(ch).Register(pb.RegisterRequest(
                info=mpb.MachineInfo(machine_id=cfg["machine_id"], role=role),
                address="127.0.0.1:1"), timeout=10)
        print(json.dumps({"event": "READY", "machine_id": cfg["machine_id"], "grpc_port": 1}), flush=True)
        _wait(stop)
    print(f"{kind} stopped at {time.monotonic_ns()}", file=sys.stderr, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(_stand_in(sys.argv[1:]))
