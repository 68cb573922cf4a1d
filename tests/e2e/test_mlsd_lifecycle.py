"""mlsd as systemd runs it: READY, WATCHDOG and STOPPING over NOTIFY_SOCKET, health, and a
SIGTERM drain that lets in-flight requests finish."""

from __future__ import annotations

import asyncio
import socket
import threading

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from proto import mlsd_pb2 as pb
from tests.e2e.test_mlsd_e2e import _machine_config
from tests.mls_driver import Driver, MachineProc


class NotifyListener:
    """A stand-in for systemd's manager: reads the notify socket continuously, as systemd does
    (the daemon never blocks on it, so an unread socket would drop messages)."""

    def __init__(self, path):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.messages: list[str] = []
        self.cv = threading.Condition()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        while True:
            try:
                msg = self.sock.recv(4096).decode()
            except OSError:
                return
            with self.cv:
                self.messages.append(msg)
                self.cv.notify_all()

    def wait_for(self, state: str, timeout_s: float = 60) -> None:
        with self.cv:
            assert self.cv.wait_for(lambda: state in self.messages, timeout_s), self.messages


@pytest.fixture
def notify(tmp_path):
    listener = NotifyListener(tmp_path / "notify.sock")
    yield listener
    listener.sock.close()


def test_notify_health_and_drain_on_sigterm(demo_model_dir, tmp_path, notify):
    env = {"NOTIFY_SOCKET": str(tmp_path / "notify.sock"), "WATCHDOG_USEC": "200000"}
    prompt_m = MachineProc(tmp_path, "prompt", _machine_config(demo_model_dir, "prompt", "tcp"), env=env)
    token_m = MachineProc(tmp_path, "token", _machine_config(demo_model_dir, "token", "tcp"))
    try:
        prompt_m.start()
        notify.wait_for("READY=1")
        notify.wait_for("WATCHDOG=1")
        assert notify.messages.index("READY=1") < notify.messages.index("WATCHDOG=1")
        token_m.start()

        async def run():
            async with Driver(prompt_m.address, token_m.address) as d:
                health = health_pb2_grpc.HealthStub(d.token_ch)
                status = await health.Check(health_pb2.HealthCheckRequest(service=""))
                assert status.status == health_pb2.HealthCheckResponse.SERVING
                # Requests in flight when SIGTERM arrives at the token machine still finish.
                long = [d.generate([7, 8, 9, 10 + i], pb.SamplingParams(max_tokens=60, ignore_eos=True))
                        for i in range(4)]
                tasks = [asyncio.create_task(c) for c in long]
                while (await d.token.GetLoad(pb.LoadRequest())).num_running < 4:
                    await asyncio.sleep(0.02)
                token_m.proc.send_signal(15)
                while not (await d.token.GetLoad(pb.LoadRequest())).draining:
                    await asyncio.sleep(0.02)
                status = await health.Check(health_pb2.HealthCheckRequest(service=""))
                assert status.status == health_pb2.HealthCheckResponse.NOT_SERVING
                try:  # no new work while draining
                    await d.token.AddDecode(pb.AddDecodeRequest(request=pb.RequestSpec(
                        request_id="late", prompt_token_ids=[5], sampling=pb.SamplingParams(max_tokens=2))))
                    raise AssertionError("a draining machine took new work")
                except grpc.aio.AioRpcError as e:
                    assert e.code() == grpc.StatusCode.UNAVAILABLE and "draining" in e.details()
                return await asyncio.gather(*tasks)

        results = asyncio.run(run())
        assert [len(r.tokens) for r in results] == [60] * 4
        assert token_m.proc.wait(30) == 0
        prompt_m.proc.send_signal(15)
        notify.wait_for("STOPPING=1")
        assert prompt_m.proc.wait(30) == 0
    finally:
        prompt_m.kill()
        token_m.kill()
