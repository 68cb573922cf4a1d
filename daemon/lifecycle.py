"""The start, serve and drain skeleton that clsd and mlsd share (systemd Type=notify).

1. The daemon builds its gRPC server and a `Lifecycle` on it (which adds the health service),
   starts the server and its own work, then calls `serving(ready_line, ...)`: health SERVING for
   every service name, SIGTERM/SIGINT set `stop` (and do nothing else), one READY line (JSON) on
   stdout, READY=1 to systemd, and a watchdog task that sends WATCHDOG=1 every interval while
   `alive()` holds (half of systemd's WatchdogSec, else the configured interval).
2. `await stop.wait()`; the daemon refuses new work, then calls `draining()`: health NOT_SERVING,
   STOPPING=1.
3. `wait_idle(idle, timeout_s)` polls until the in-flight work is done or the drain deadline
   passes; the daemon then calls `close()` (the watchdog stops) and stops its servers.
"""

from __future__ import annotations

import asyncio
import json
import signal
import time
from collections.abc import Callable, Sequence

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from prometheus_client import CollectorRegistry, start_http_server

from daemon import notify


class Lifecycle:
    def __init__(self, server: grpc.aio.Server, service_names: Sequence[str]):
        self.service_names = tuple(service_names)
        self.health = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        self.stop = asyncio.Event()
        """Set by SIGTERM/SIGINT once `serving` ran."""
        self._watchdog: asyncio.Task | None = None

    async def serving(self, ready_line: dict, watchdog_interval_s: float,
                      alive: Callable[[], bool] = lambda: True) -> None:
        await self._set_health(health_pb2.HealthCheckResponse.SERVING)
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.stop.set)
        print(json.dumps({"event": "READY", **ready_line}), flush=True)
        notify.notify("READY=1")
        interval_s = notify.watchdog_interval_s() or watchdog_interval_s
        self._watchdog = asyncio.create_task(_watchdog(interval_s, alive))

    async def draining(self) -> None:
        await self._set_health(health_pb2.HealthCheckResponse.NOT_SERVING)
        notify.notify("STOPPING=1")

    def close(self) -> None:
        if self._watchdog is not None:
            self._watchdog.cancel()

    async def _set_health(self, status) -> None:
        for name in self.service_names:
            await self.health.set(name, status)


async def wait_idle(idle: Callable[[], bool], timeout_s: float) -> bool:
    """Polls `idle()` until it holds or `timeout_s` passes; returns whether it holds."""
    deadline = time.monotonic() + timeout_s
    while not idle() and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    return idle()


def start_metrics_endpoint(port: int | None, host: str, registry: CollectorRegistry) -> int | None:
    """Serves `registry` on http://host:port/metrics (0 picks a free port); returns the bound
    port, or None when `port` is None (the endpoint is off)."""
    if port is None:
        return None
    httpd, _ = start_http_server(port, addr=host, registry=registry)
    return httpd.server_port


async def _watchdog(interval_s: float, alive: Callable[[], bool]) -> None:
    while True:
        await asyncio.sleep(interval_s)
        if alive():  # clsd: the event loop turned; mlsd: the engine thread lives too
            notify.notify("WATCHDOG=1")
