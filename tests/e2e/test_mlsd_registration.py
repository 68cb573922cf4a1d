"""mlsd registers with clsd and heartbeats its load: a real mlsd process (a tiny random model)
against an in-process fake RegistryService."""

from __future__ import annotations

import asyncio

import grpc
import pytest

from proto import clsd_pb2, clsd_pb2_grpc, mlsd_pb2_grpc
from proto import mlsd_pb2 as pb
from tests.conftest import make_tiny_checkpoint, write_word_tokenizer
from tests.mls_driver import MachineProc

HEARTBEAT_S = 0.2


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-llama")
    make_tiny_checkpoint(path, "llama")  # vocab of 256, 2 layers
    write_word_tokenizer(path)
    return path


class FakeRegistry(clsd_pb2_grpc.RegistryServiceServicer):
    """Records every RPC; answers known=false to leases it was told to forget, and UNAVAILABLE
    to every heartbeat while `failing`."""

    def __init__(self):
        self.registers: list[tuple[clsd_pb2.RegisterRequest, str]] = []  # (request, lease id)
        self.heartbeats: list[clsd_pb2.HeartbeatRequest] = []
        self.leases: set[str] = set()
        self.failing = False
        self.num_failed = 0
        self.changed = asyncio.Condition()

    async def Register(self, request, context):
        async with self.changed:
            lease_id = f"lease-{len(self.registers) + 1}"
            self.registers.append((request, lease_id))
            self.leases.add(lease_id)
            self.changed.notify_all()
        return clsd_pb2.RegisterReply(lease_id=lease_id, lease_ttl_s=3.0,
                                      heartbeat_interval_s=HEARTBEAT_S)

    async def Heartbeat(self, request, context):
        async with self.changed:
            if self.failing:
                self.num_failed += 1
                self.changed.notify_all()
                await context.abort(grpc.StatusCode.UNAVAILABLE, "clsd is restarting")
            self.heartbeats.append(request)
            self.changed.notify_all()
        return clsd_pb2.HeartbeatReply(known=request.lease_id in self.leases)

    async def wait_for(self, predicate, timeout_s: float = 30.0) -> None:
        async with self.changed:
            await asyncio.wait_for(self.changed.wait_for(predicate), timeout_s)

    def beats_of(self, lease_id: str) -> list[clsd_pb2.HeartbeatRequest]:
        return [h for h in self.heartbeats if h.lease_id == lease_id]


async def _start_registry(address: str = "127.0.0.1:0") -> tuple[FakeRegistry, grpc.aio.Server, int]:
    registry, server = FakeRegistry(), grpc.aio.server()
    clsd_pb2_grpc.add_RegistryServiceServicer_to_server(registry, server)
    port = server.add_insecure_port(address)
    await server.start()
    return registry, server, port


def _config(model_dir, cls_port: int) -> dict:
    return {
        "machine_id": "reg-0", "role": "prompt", "metrics_port": None, "drain_timeout_s": 10,
        "cls_address": f"127.0.0.1:{cls_port}",
        "engine": {"model": str(model_dir), "dtype": "float32", "block_size": 16,
                   "kv_cache_bytes": 2**20},
        "kv_transfer": {"transport": "tcp"},
    }


def test_register_heartbeat_reregister_and_report_draining(tiny_model_dir, tmp_path):
    async def run():
        registry, server, port = await _start_registry()
        machine = MachineProc(tmp_path, "reg", _config(tiny_model_dir, port))
        try:
            await asyncio.to_thread(machine.start)
            # 1. Register: the machine's GetInfo, and the address clsd should dial.
            await registry.wait_for(lambda: len(registry.registers) >= 1)
            request, lease = registry.registers[0]
            async with grpc.aio.insecure_channel(machine.address) as ch:
                info = await mlsd_pb2_grpc.MachineServiceStub(ch).GetInfo(pb.InfoRequest(), timeout=10)
            assert request.info == info
            assert (request.info.machine_id, request.info.role) == ("reg-0", pb.PROMPT)
            assert request.info.kv_address == machine.kv_address != b""  # every machine receives KV
            assert request.address == machine.address
            # 2. Heartbeats carry the load report, every interval.
            await registry.wait_for(lambda: len(registry.beats_of(lease)) >= 3)
            load = registry.beats_of(lease)[0].load
            assert (load.machine_id, load.role, load.draining) == ("reg-0", pb.PROMPT, False)
            assert load.kv_blocks_free > 0 and load.kv_blocks_used == 0
            # 3. A lease clsd no longer knows: the machine registers again, with a new lease.
            registry.leases.clear()
            await registry.wait_for(lambda: len(registry.registers) >= 2)
            lease = registry.registers[1][1]
            assert registry.registers[1][0].info == info
            await registry.wait_for(lambda: len(registry.beats_of(lease)) >= 1)
            # 4. clsd failing: the machine retries (about every second), logging the outage
            # once, not once per try; then the same lease goes on.
            registry.failing = True
            await registry.wait_for(lambda: registry.num_failed >= 3)
            registry.failing = False
            num_beats = len(registry.beats_of(lease))
            await registry.wait_for(lambda: len(registry.beats_of(lease)) > num_beats)
            log = machine.log()
            assert log.count("unreachable (UNAVAILABLE: clsd is restarting)") == 1, log
            assert len(registry.registers) == 2
            # 5. clsd restarts on the same port knowing no lease: the machine registers anew.
            await server.stop(grace=None)
            registry, server, _ = await _start_registry(f"127.0.0.1:{port}")
            await registry.wait_for(lambda: len(registry.registers) >= 1)
            lease = registry.registers[0][1]
            await registry.wait_for(lambda: len(registry.beats_of(lease)) >= 1)
            # 6. SIGTERM: the reports say draining before the process exits, cleanly.
            machine.proc.send_signal(15)
            await registry.wait_for(lambda: any(h.load.draining for h in registry.heartbeats))
            assert await asyncio.to_thread(machine.proc.wait, 30) == 0
        finally:
            machine.kill()
            await server.stop(grace=None)

    asyncio.run(run())
