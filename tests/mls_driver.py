"""Plays the cluster scheduler against real mlsd processes (until clsd exists).

1. `MachineProc` starts `python -m mls.mlsd` with a config on port 0 and reads its READY line.
2. `Driver.generate`: AddDecode on the token machine, wait for RESERVED, Prefill on the prompt
   machine (naming the token machine's KV address), then collect the token machine's stream
   until FINISHED / FAILED / ABORTED. Tokens are placed by index, each index exactly once.
   Any machine takes any work: the two addresses may name machines of either role.
3. `Driver.generate_colocated`: Generate on the token-side machine, both phases there.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import yaml

from proto import mlsd_pb2 as pb
from proto import mlsd_pb2_grpc

ROOT = Path(__file__).resolve().parents[1]


class DaemonProc:
    """A daemon (`python -m MODULE --config FILE`) that prints one READY JSON line on stdout."""

    module = "mls.mlsd"

    def __init__(self, tmp_dir: Path, name: str, config: dict, env: dict | None = None):
        self.name = name
        self.config_path = tmp_dir / f"{name}.yaml"
        self.config_path.write_text(yaml.safe_dump(config))
        self.log_path = tmp_dir / f"{name}.log"
        self.env = dict(os.environ, PYTHONUNBUFFERED="1", **(env or {}))
        self.proc: subprocess.Popen | None = None
        self.ready: dict = {}

    def start(self, timeout_s: float = 120.0):
        self._log = open(self.log_path, "w")
        self.proc = subprocess.Popen([sys.executable, "-m", self.module, "--config",
                                      str(self.config_path)], cwd=ROOT, env=self.env,
                                     stdout=subprocess.PIPE, stderr=self._log, text=True)
        line: list[str] = []
        reader = threading.Thread(target=lambda: line.append(self.proc.stdout.readline()), daemon=True)
        reader.start()
        reader.join(timeout_s)
        if not line or not line[0].startswith("{"):
            self.kill()
            raise RuntimeError(f"{self.name} did not become ready:\n{self.log_path.read_text()[-3000:]}")
        self.ready = json.loads(line[0])
        return self

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.ready['grpc_port']}"

    def stop(self, timeout_s: float = 60.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout_s)
        finally:
            self._log.close()

    def kill(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)

    def log(self) -> str:
        return self.log_path.read_text()


class MachineProc(DaemonProc):
    module = "mls.mlsd"

    @property
    def kv_address(self) -> bytes:
        return bytes.fromhex(self.ready["kv_address"])


@dataclass
class Result:
    request_id: str
    tokens: list[int] = field(default_factory=list)
    status: str = ""  # FINISHED, FAILED or ABORTED
    finish_reason: str = ""
    message: str = ""
    ttft_s: float = 0.0
    e2e_s: float = 0.0
    kv_mode: str = ""


class Driver:
    """One prompt machine and one token machine, addressed over gRPC."""

    _ids = itertools.count()

    def __init__(self, prompt_addr: str, token_addr: str):
        self.prompt_ch = grpc.aio.insecure_channel(prompt_addr)
        self.token_ch = grpc.aio.insecure_channel(token_addr)
        self.prompt = mlsd_pb2_grpc.MachineServiceStub(self.prompt_ch)
        self.token = mlsd_pb2_grpc.MachineServiceStub(self.token_ch)
        self._queues: dict[str, asyncio.Queue] = {}
        self._stream_task: asyncio.Task | None = None

    async def __aenter__(self) -> Driver:
        self.token_info = await self.token.GetInfo(pb.InfoRequest(), timeout=10)
        stream = self.token.StreamEvents(pb.StreamEventsRequest())
        self._stream_task = asyncio.create_task(self._consume(stream))
        await asyncio.sleep(0)  # let the subscription start before any work is sent
        await self.token.GetLoad(pb.LoadRequest(), timeout=10)  # a round trip: stream is open
        return self

    async def __aexit__(self, *exc) -> None:
        self._stream_task.cancel()
        await self.prompt_ch.close()
        await self.token_ch.close()

    async def _consume(self, stream) -> None:
        async for msg in stream:
            for t in msg.tokens:
                q = self._queues.get(t.request_id)
                if q is not None:
                    q.put_nowait(("token", t.index, t.token_id))
            for e in msg.events:
                q = self._queues.get(e.request_id)
                if q is not None:
                    q.put_nowait(("event", pb.RequestEvent.Kind.Name(e.kind), e))

    def watch(self, request_id: str) -> asyncio.Queue:
        """Events and tokens of a request driven by hand (not through `generate`)."""
        q: asyncio.Queue = asyncio.Queue()
        self._queues[request_id] = q
        return q

    async def next_event(self, q: asyncio.Queue, kind: str, timeout_s: float):
        async with asyncio.timeout(timeout_s):
            while True:
                item = await q.get()
                if item[0] == "event" and item[1] == kind:
                    return item[2]

    async def generate_colocated(self, prompt: list[int], sampling: pb.SamplingParams,
                                 request_id: str | None = None, timeout_s: float = 120.0) -> Result:
        """Both phases on the token-side machine; its stream carries every token, index 0 too."""
        rid = request_id or f"req-{next(self._ids)}"
        q = self.watch(rid)
        res = Result(rid)
        start = time.monotonic()
        try:
            async with asyncio.timeout(timeout_s):
                await self.token.Generate(pb.GenerateRequest(request=pb.RequestSpec(
                    request_id=rid, prompt_token_ids=prompt, sampling=sampling)))
                while not res.status:
                    item = await q.get()
                    if item[0] == "token":
                        _, index, token = item
                        assert index == len(res.tokens), (rid, index, len(res.tokens))
                        res.tokens.append(token)
                        res.ttft_s = res.ttft_s or time.monotonic() - start
                    elif item[1] != "RESERVED":
                        e = item[2]
                        res.status, res.finish_reason, res.message = item[1], e.finish_reason, e.message
        finally:
            self._queues.pop(rid, None)
        res.e2e_s = time.monotonic() - start
        return res

    async def generate(self, prompt: list[int], sampling: pb.SamplingParams,
                       request_id: str | None = None, timeout_s: float = 120.0,
                       transfer_timeout_s: float = 0.0) -> Result:
        rid = request_id or f"req-{next(self._ids)}"
        q: asyncio.Queue = asyncio.Queue()
        self._queues[rid] = q
        res = Result(rid)
        start = time.monotonic()
        spec = pb.RequestSpec(request_id=rid, prompt_token_ids=prompt, sampling=sampling)
        try:
            async with asyncio.timeout(timeout_s):
                reply = await self.token.AddDecode(pb.AddDecodeRequest(
                    request=spec, transfer_timeout_s=transfer_timeout_s))
                pending: list = []
                while not reply.reserved:  # wait for memory on the token machine
                    item = await q.get()
                    if item[0] == "event" and item[1] == "RESERVED":
                        break
                    pending.append(item)
                for item in pending:
                    q.put_nowait(item)
                pre = await self.prompt.Prefill(pb.PrefillRequest(
                    request=spec, kv_address=self.token_info.kv_address,
                    transfer_timeout_s=transfer_timeout_s))
                res.ttft_s, res.kv_mode = time.monotonic() - start, pre.kv_mode
                res.tokens.append(pre.first_token_id)
                while not res.status:
                    item = await q.get()
                    if item[0] == "token":
                        _, index, token = item
                        assert index == len(res.tokens), (rid, index, len(res.tokens))
                        res.tokens.append(token)
                    elif item[1] != "RESERVED":
                        e = item[2]
                        res.status, res.finish_reason, res.message = item[1], e.finish_reason, e.message
        finally:
            self._queues.pop(rid, None)
        res.e2e_s = time.monotonic() - start
        return res
