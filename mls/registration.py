"""Registration with the cluster scheduler: this machine's lease in clsd's registry.

Life cycle of the lease (one asyncio task, started by mlsd after READY when `cls_address` is set):
1. Register(info, address): the same MachineInfo that GetInfo returns (the configured role is the
   home pool) and the address clsd dials; clsd answers with a lease id, the lease's ttl and the
   heartbeat interval.
2. Every heartbeat_interval_s, or at once after `report_now()` (mlsd calls it when the drain
   starts): Heartbeat(lease_id, load), the same LoadReport that GetLoad returns, draining flag
   included. `reported()` waits until a heartbeat begun after `report_now()` has been answered.
3. known=false: the lease is gone (clsd restarted, or heard nothing for a ttl): register again,
   as a new machine with a new lease.
4. clsd unreachable, or an RPC failed: every RPC has a deadline (min(2 s, ttl / 2)); the same step
   is retried every retry_interval_s, with one log line when the state changes, not one per try.
5. Orphans: a lease clsd no longer knows (known=false) means clsd has given this machine's
   requests up (re-routed or failed them): `on_orphaned` is called at once, and mlsd aborts
   them. clsd unreachable for longer than `orphan_grace_s` (it died, or this machine is cut off):
   `on_orphaned` once per outage, since no one reads those tokens.
6. The task heartbeats through the drain (draining=true) until mlsd cancels it as the server
   stops, after `reported()` (bounded by the RPC deadline): clsd has seen draining=true at least
   once. No goodbye: the lease then expires.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

import grpc

from proto import clsd_pb2, clsd_pb2_grpc
from proto import mlsd_pb2 as pb

log = logging.getLogger("mlsd.registration")

MAX_RPC_TIMEOUT_S = 2.0


class Registration:
    def __init__(self, cls_address: str, address: str, info: Callable[[], pb.MachineInfo],
                 load_report: Callable[[], pb.LoadReport], retry_interval_s: float = 1.0,
                 healthy: Callable[[], bool] = lambda: True,
                 on_orphaned: Callable[[str], None] | None = None, orphan_grace_s: float = 10.0):
        self.cls_address, self.address = cls_address, address
        self._healthy = healthy
        self._info, self._load_report = info, load_report
        self.retry_interval_s = retry_interval_s
        self.lease_id: str | None = None
        self.lease_ttl_s = 0.0
        self.heartbeat_interval_s = retry_interval_s
        self._state = "starting"
        self._wake = asyncio.Event()
        self._num_started = self._num_answered = 0  # heartbeats, by the order they were built
        self._wanted = 0  # the heartbeat `reported()` waits for
        self._answered = asyncio.Condition()
        self._on_orphaned, self.orphan_grace_s = on_orphaned, orphan_grace_s
        self._unreachable_since: float | None = None
        self._orphaned_this_outage = False

    @property
    def rpc_timeout_s(self) -> float:
        return min(MAX_RPC_TIMEOUT_S, self.lease_ttl_s / 2) if self.lease_ttl_s > 0 else MAX_RPC_TIMEOUT_S

    def report_now(self) -> None:
        """Sends the next heartbeat now rather than at the next interval."""
        self._wanted = self._num_started + 1
        self._wake.set()

    async def reported(self, timeout_s: float | None = None) -> bool:
        """Whether a heartbeat begun after the last `report_now()` was answered (waits up to
        timeout_s, default the RPC deadline)."""
        async with self._answered:
            try:
                await asyncio.wait_for(self._answered.wait_for(lambda: self._num_answered >= self._wanted),
                                       self.rpc_timeout_s if timeout_s is None else timeout_s)
            except TimeoutError:
                return False
        return True

    async def run(self) -> None:
        # Reconnect attempts follow our retry pace: gRPC's default backoff grows to two minutes,
        # which would keep the machine out of a restarted clsd's registry long after it is back.
        backoff_ms = int(self.retry_interval_s * 1000)
        channel = grpc.aio.insecure_channel(self.cls_address, options=[
            ("grpc.initial_reconnect_backoff_ms", backoff_ms),
            ("grpc.min_reconnect_backoff_ms", backoff_ms),
            ("grpc.max_reconnect_backoff_ms", backoff_ms)])
        stub = clsd_pb2_grpc.RegistryServiceStub(channel)
        try:
            while True:
                if not self._healthy():  # a machine that cannot serve lets its lease expire
                    self._set_state("unhealthy", "machine cannot serve; heartbeats to %s stop",
                                    self.cls_address)
                    await self._sleep(self.retry_interval_s)
                    continue
                try:
                    delay = await (self._heartbeat(stub) if self.lease_id else self._register(stub))
                    self._unreachable_since, self._orphaned_this_outage = None, False
                except asyncio.CancelledError:
                    raise
                except Exception as e:  # noqa: BLE001 - any failure is retried, never fatal
                    self._set_state("unreachable", "clsd at %s unreachable (%s); retrying every %g s",
                                    self.cls_address, _describe(e), self.retry_interval_s)
                    delay = self.retry_interval_s
                    self._check_outage()
                await self._sleep(delay)
        finally:
            await channel.close()

    async def _register(self, stub) -> float:
        reply = await stub.Register(clsd_pb2.RegisterRequest(info=self._info(), address=self.address),
                                    timeout=MAX_RPC_TIMEOUT_S)
        self.lease_id, self.lease_ttl_s = reply.lease_id, reply.lease_ttl_s
        self.heartbeat_interval_s = (reply.heartbeat_interval_s if reply.heartbeat_interval_s > 0
                                     else max(reply.lease_ttl_s / 3, self.retry_interval_s))
        self._state = "registered"  # every registration is news: a new lease
        log.info("registered with clsd at %s as %s: lease %s, ttl %g s, heartbeat every %g s",
                 self.cls_address, self.address, self.lease_id, self.lease_ttl_s,
                 self.heartbeat_interval_s)
        return self.heartbeat_interval_s

    async def _heartbeat(self, stub) -> float:
        self._num_started += 1
        number = self._num_started
        reply = await stub.Heartbeat(clsd_pb2.HeartbeatRequest(lease_id=self.lease_id,
                                                               load=self._load_report()),
                                     timeout=self.rpc_timeout_s)
        async with self._answered:
            self._num_answered = number
            self._answered.notify_all()
        if not reply.known:
            self._set_state("lease lost", "clsd at %s no longer knows lease %s; registering again",
                            self.cls_address, self.lease_id)
            self.lease_id = None
            self._orphaned("clsd no longer knows this machine's lease")
            return 0.0
        self._set_state("registered", "clsd at %s reachable again; lease %s kept", self.cls_address,
                        self.lease_id)
        return self.heartbeat_interval_s

    def _check_outage(self) -> None:
        now = time.monotonic()
        if self._unreachable_since is None:
            self._unreachable_since = now
        elif not self._orphaned_this_outage and now - self._unreachable_since >= self.orphan_grace_s:
            self._orphaned_this_outage = True
            self._orphaned(f"clsd unreachable for {now - self._unreachable_since:.0f} s")

    def _orphaned(self, reason: str) -> None:
        if self._on_orphaned is not None:
            self._on_orphaned(reason)

    async def _sleep(self, delay_s: float) -> None:
        try:
            await asyncio.wait_for(self._wake.wait(), delay_s)
        except TimeoutError:
            pass
        self._wake.clear()

    def _set_state(self, state: str, msg: str, *args) -> None:
        if state != self._state:
            self._state = state
            log.log(logging.INFO if state == "registered" else logging.WARNING, msg, *args)


def _describe(e: Exception) -> str:
    if isinstance(e, grpc.aio.AioRpcError):
        return f"{e.code().name}: {e.details()}"
    return f"{type(e).__name__}: {e}"
