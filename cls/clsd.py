"""clsd: the cluster-level scheduler daemon.

1. `main()` loads the YAML config and the admin token file, loads the tokenizer (no torch on the
   CLS host) and the operator's pool sizes kept in `state_dir` (cls/pool_targets.py), binds the
   gRPC server (ClientService, AdminService, RegistryService, each parsing its own requests so
   corrupt bytes are INVALID_ARGUMENT: cls/checked_rpc.py; health), starts
   the metrics endpoint and, when `http.port` is set, the OpenAI-compatible HTTP server
   (cls/http/server.py, uvicorn as a task in this event loop), prints one READY line (JSON with
   the bound ports) and tells systemd READY=1 (daemon/lifecycle.py, shared with mlsd).
2. Machines register and heartbeat (cls/registry.py); clients call Generate (cls/service.py),
   and each request runs through the Dispatcher (cls/dispatcher.py).
3. While serving, a watchdog task sends WATCHDOG=1 as long as the event loop turns, and a
   metrics task refreshes pool gauges and the in-flight bound once a second. Nothing heavy runs
   on the loop (prompts are tokenized on threads), so leases and heartbeats keep their pace.
4. SIGTERM/SIGINT only set an event. Drain: health NOT_SERVING (HTTP /health 503), STOPPING=1,
   new requests get UNAVAILABLE (HTTP 503), in-flight requests of both doors finish (up to
   drain_timeout_s), then the HTTP and gRPC servers stop and the process exits 0.
"""

from __future__ import annotations

import asyncio
import logging
import sys
import time

import grpc

from cls.admission import inflight_bound
from cls.checked_rpc import add_checked
from cls.config import ClsConfig
from cls.metrics import ClsMetrics
from cls.service import AdminService, ClientService, ClusterState, RegistryService
from daemon.lifecycle import Lifecycle, start_metrics_endpoint, wait_idle
from daemon.settings import ConfigError, load_daemon_config
from engine.tokenizer import Tokenizer
from proto import clsd_pb2_grpc

log = logging.getLogger("clsd")
SERVICE_NAMES = ("", "splitserve.cls.v1.ClientService")


async def serve(cfg: ClsConfig) -> int:
    t0 = time.monotonic()
    metrics = ClsMetrics()
    state = ClusterState(cfg, Tokenizer(cfg.model), metrics)
    metrics_port = start_metrics_endpoint(cfg.metrics_port, cfg.host, metrics.registry)

    server = grpc.aio.server(options=[("grpc.max_receive_message_length", 16 * 2**20)])
    add_checked(clsd_pb2_grpc.add_ClientServiceServicer_to_server, ClientService(state), server)
    add_checked(clsd_pb2_grpc.add_AdminServiceServicer_to_server, AdminService(state), server)
    add_checked(clsd_pb2_grpc.add_RegistryServiceServicer_to_server, RegistryService(state), server)
    if state.pool_targets.path is None:
        log.info("no state_dir: pool sizes set with `clsctl pools resize` last until clsd stops")
    lifecycle = Lifecycle(server, SERVICE_NAMES)
    port = server.add_insecure_port(f"{cfg.host}:{cfg.grpc_port}")
    http = None
    if cfg.http.port is not None:
        from cls.http.server import HttpFrontDoor  # fastapi + uvicorn only when the door is on

        http = HttpFrontDoor(state)
        await http.start()
    await server.start()
    state.registry.start()

    # The watchdog's WATCHDOG=1 says the event loop turned: clsd is not wedged.
    await lifecycle.serving({"grpc_port": port, "metrics_port": metrics_port,
                             "http_port": http.port if http else None, "model": cfg.served_model_name,
                             "http_api_key_required": cfg.http.api_key_file is not None},
                            cfg.watchdog_interval_s)
    log.info("serving on %s:%d after %.1f s", cfg.host, port, time.monotonic() - t0)
    if http:
        log.info("OpenAI-compatible HTTP on http://%s:%d/v1 (model %r)", http.host, http.port,
                 cfg.served_model_name)
    refresh = asyncio.create_task(_refresh_metrics(state))

    await lifecycle.stop.wait()
    log.info("draining: finishing %d in-flight requests", len(state.inflight))
    state.draining = True
    await lifecycle.draining()
    if not await wait_idle(lambda: not state.num_inflight, cfg.drain_timeout_s):
        log.warning("drain timed out with %d requests in flight", len(state.inflight))
    lifecycle.close()
    refresh.cancel()
    if http:
        await http.stop()
    await server.stop(grace=2.0)
    await state.registry.close()
    state.tokenizers.close()
    log.info("stopped")
    return 0


async def _refresh_metrics(state: ClusterState) -> None:
    while True:
        state.metrics.observe_pools(state.pools)
        state.metrics.inflight_bound.set(inflight_bound(state.pools, state.cfg.limits)[0])
        state.metrics.tokenizer_queue.set(state.tokenizers.num_long)
        await asyncio.sleep(1.0)


def main(argv: list[str] | None = None) -> int:
    cfg = load_daemon_config(ClsConfig, "clsd", "Cluster-level scheduler daemon.", argv)
    if isinstance(cfg, int):
        return cfg
    try:
        cfg.admin_token()  # a missing or empty token file fails now, not on the first admin call
        cfg.http_api_key()
        return asyncio.run(serve(cfg))
    except ConfigError as e:
        print(f"clsd: config error: {e}", file=sys.stderr)
        return 2
    except FileNotFoundError as e:  # the tokenizer
        print(f"clsd: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
