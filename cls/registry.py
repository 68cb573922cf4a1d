"""The machine registry: leases, one link per machine, and the machines' event streams.

Life cycle of a machine here:
1. `register` (mlsd's Register RPC): a machine id already present is a restarted machine, so the
   old incarnation is dropped first (its requests re-routed). The new one gets a lease, joins its
   home pool (`home_for`: the operator's last resize, kept across clsd restarts by
   cls/pool_targets.py, else its configured role), and clsd opens a channel to it and subscribes
   to its event stream. Requests go to it on its Work stream (cls/work_stream.py), opened on
   first use.
2. `heartbeat` renews the lease and applies the load report to the pools.
3. Tokens and request events from the machine's stream go to `on_events(machine_id, msg)`.
4. A machine is lost when its lease expires or its event stream breaks: it leaves the pools,
   its channel closes, and `on_lost(machine_id, reason)` re-routes its requests. A machine that
   is still alive learns from its next heartbeat (known=false) and registers again, as new.
   Leases count only time in which clsd's event loop turned: after a stall (the loop held by
   something else) every lease is extended by the stall, since no heartbeat could be read in it.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import grpc

from cls.pools import PoolError, Pools
from cls.work_stream import WorkStream
from proto import mlsd_pb2 as mpb
from proto import mlsd_pb2_grpc
from proto.roles import Role

log = logging.getLogger("clsd.registry")

SUBSCRIBE_TIMEOUT_S = 10.0


def home_of(role: int) -> Role:
    """A registering machine's home pool from its configured role (unset: token)."""
    try:
        return Role.from_pb(role).home
    except ValueError:
        return Role.TOKEN


class RegistrationError(ValueError):
    """A registration clsd cannot accept; the message names the problem."""


@dataclass
class MachineLink:
    machine_id: str
    lease_id: str
    address: str
    info: mpb.MachineInfo
    channel: grpc.aio.Channel
    stub: mlsd_pb2_grpc.MachineServiceStub
    expires_at: float
    work: WorkStream
    stream_task: asyncio.Task | None = None
    subscribed: asyncio.Event = field(default_factory=asyncio.Event)
    requests: set[str] = field(default_factory=set)
    """Attempt ids of requests clsd has in flight on this machine."""


class Registry:
    def __init__(self, pools: Pools, lease_ttl_s: float, on_events: Callable, on_lost: Callable,
                 home_for: Callable[[str, Role], Role] | None = None):
        """`home_for(machine_id, configured home)` is a registering machine's home pool."""
        self.pools, self.lease_ttl_s = pools, lease_ttl_s
        self.on_events, self.on_lost = on_events, on_lost
        self.home_for = home_for or (lambda machine_id, configured: configured)
        self.links: dict[str, MachineLink] = {}
        self._by_lease: dict[str, str] = {}
        self._expiry_task: asyncio.Task | None = None

    def start(self) -> None:
        self._expiry_task = asyncio.create_task(self._expire_loop())

    async def close(self) -> None:
        if self._expiry_task:
            self._expiry_task.cancel()
        for mid in list(self.links):
            await self._drop(mid, None)

    # -- registration and leases --------------------------------------------------------------

    async def register(self, info: mpb.MachineInfo, address: str) -> MachineLink:
        if not info.machine_id:
            raise RegistrationError("info.machine_id is empty")
        if not address or ":" not in address:
            raise RegistrationError(f"address must be host:port, got {address!r}")
        if info.kv_num_blocks == 0 or info.kv_block_size == 0:
            raise RegistrationError("info.kv_num_blocks and info.kv_block_size must be positive")
        if info.machine_id in self.links:
            log.warning("machine %s registered again: dropping its old incarnation", info.machine_id)
            await self._drop(info.machine_id, "the machine restarted")
        channel = grpc.aio.insecure_channel(address)
        stub = mlsd_pb2_grpc.MachineServiceStub(channel)
        link = MachineLink(info.machine_id, secrets.token_hex(8), address, info, channel, stub,
                           time.monotonic() + self.lease_ttl_s, WorkStream(stub, info.machine_id))
        # Subscribe before the machine can be routed to, so none of its tokens is missed.
        link.stream_task = asyncio.create_task(self._consume(link))
        waiter = asyncio.ensure_future(link.subscribed.wait())
        await asyncio.wait({waiter, link.stream_task}, timeout=SUBSCRIBE_TIMEOUT_S,
                           return_when=asyncio.FIRST_COMPLETED)
        waiter.cancel()
        try:
            if not link.subscribed.is_set():
                raise TimeoutError(f"cannot subscribe to the event stream of {address}")
            configured = home_of(info.role)
            home = self.home_for(info.machine_id, configured)
            if home != configured:
                log.info("machine %s: home pool %s (the operator's resize), not its configured %s",
                         info.machine_id, home, configured)
            self.pools.add(info.machine_id, home, info.kv_num_blocks, info.kv_block_size,
                           info.max_model_len)
        except (TimeoutError, PoolError) as e:
            link.stream_task.cancel()
            await channel.close(grace=None)
            raise RegistrationError(str(e)) from None
        self.links[info.machine_id] = link
        self._by_lease[link.lease_id] = info.machine_id
        log.info("machine %s registered from %s (home %s, %d KV blocks)", info.machine_id, address,
                 self.pools.get(info.machine_id).home, info.kv_num_blocks)
        return link

    def heartbeat(self, lease_id: str, load: mpb.LoadReport) -> bool:
        mid = self._by_lease.get(lease_id)
        if mid is None:
            return False
        link = self.links[mid]
        link.expires_at = time.monotonic() + self.lease_ttl_s
        self.pools.update_load(mid, pending_prompt_tokens=load.pending_prompt_tokens,
                               prompt_queue_len=load.prompt_queue_len,
                               pending_decode_tokens=load.pending_decode_tokens,
                               kv_blocks_free=load.kv_blocks_free)
        m = self.pools.get(mid)
        if load.draining and not m.draining:  # a machine that drains itself takes no new work
            self.pools.set_draining(mid, True)
        for move in self.pools.return_idle(mid):
            log.info("machine %s returns to the %s pool", mid, move.to_pool)
        return True

    async def _expire_loop(self) -> None:
        interval_s = min(0.25, self.lease_ttl_s / 4)
        last = time.monotonic()
        while True:
            await asyncio.sleep(interval_s)
            now = time.monotonic()
            stall_s = now - last - interval_s
            if stall_s > interval_s:
                # The loop was held: heartbeats that came meanwhile are still unread, and the
                # machines must not pay for clsd's stall.
                if stall_s >= 1.0:
                    log.warning("event loop stalled for %.1f s: leases extended by it", stall_s)
                for link in self.links.values():
                    link.expires_at += stall_s
            for mid, link in list(self.links.items()):
                if link.expires_at < now:
                    log.warning("machine %s: lease expired", mid)
                    await self._drop(mid, f"machine {mid} stopped reporting (lease expired)")
            last = time.monotonic()

    # -- the machine's event stream -----------------------------------------------------------

    async def _consume(self, link: MachineLink) -> None:
        reason = "its event stream ended"
        try:
            stream = link.stub.StreamEvents(mpb.StreamEventsRequest())
            await stream.wait_for_connection()
            link.subscribed.set()
            async for msg in stream:
                self.on_events(link.machine_id, msg)
        except asyncio.CancelledError:
            return
        except grpc.aio.AioRpcError as e:
            reason = f"its event stream failed: {e.code().name} {e.details()}"
        except Exception as e:  # noqa: BLE001 - a bug in dispatch must not leave the machine half-known
            log.exception("machine %s: event dispatch failed", link.machine_id)
            reason = f"event dispatch failed: {e}"
        if self.links.get(link.machine_id) is link:
            log.warning("machine %s lost: %s", link.machine_id, reason)
            await self._drop(link.machine_id, f"machine {link.machine_id} lost: {reason}")

    async def _drop(self, machine_id: str, reason: str | None) -> None:
        link = self.links.pop(machine_id, None)
        if link is None:
            return
        self._by_lease.pop(link.lease_id, None)
        self.pools.remove(machine_id)
        if link.stream_task is not None and link.stream_task is not asyncio.current_task():
            link.stream_task.cancel()
        link.work.close()  # its waiting calls fail now; the attempts re-route on `on_lost`
        if reason is not None:
            self.on_lost(machine_id, reason)
        await link.channel.close(grace=None)
