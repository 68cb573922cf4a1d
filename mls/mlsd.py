"""mlsd: the machine-level scheduler daemon.

1. `main()` loads the YAML config, builds the engine (loads the model), both ends of the KV
   transport (any machine may prefill for another or decode for another: the configured role is
   only its home pool), the worker thread and the gRPC server (MachineService + health), starts
   the metrics endpoint, prints one READY line (JSON with the bound ports) and tells systemd
   READY=1 (daemon/lifecycle.py, shared with clsd).
2. While serving, a watchdog task sends WATCHDOG=1 as long as the worker thread is alive, and,
   when `cls_address` is set, a registration task holds the machine's lease in clsd's registry
   (mls/registration.py).
3. SIGTERM/SIGINT only set an event. Drain: health NOT_SERVING, STOPPING=1, no new work (the
   next heartbeat tells clsd), in-flight requests finish (up to drain_timeout_s), then the
   registration stops, the server stops and the process exits 0.
"""

from __future__ import annotations

import asyncio
import logging
import sys
import time

import grpc

from daemon.lifecycle import Lifecycle, start_metrics_endpoint, wait_idle
from daemon.settings import load_daemon_config
from engine.config import EngineConfig
from engine.engine import Engine
from mls.config import MlsConfig
from mls.kv.factory import make_endpoints
from mls.metrics import MlsMetrics
from mls.registration import Registration
from mls.service import MachineService
from mls.worker import EngineWorker
from proto import mlsd_pb2_grpc

log = logging.getLogger("mlsd")
SERVICE_NAME = "splitserve.mls.v1.MachineService"


def build_engine(cfg: MlsConfig) -> Engine:
    e = cfg.engine
    config = EngineConfig(
        model=e.model, dtype=e.dtype, device=e.device, block_size=e.block_size,
        kv_cache_bytes=e.kv_cache_bytes, kv_cache_memory_fraction=e.kv_cache_memory_fraction,
        max_num_seqs=e.max_num_seqs, prompt_token_cap=cfg.scheduler.prompt_token_cap,
        max_model_len=e.max_model_len, num_threads=e.num_threads, seed=e.seed,
        # shm: senders on this host write KV straight into the cache (a device cache: bytes inline)
        kv_cache_shared_memory=cfg.kv_transfer.transport == "shm" and e.device == "cpu")
    if e.backend == "modelled":
        from engine.modelled import latency_model
        from engine.modelled_engine import ModelledEngine

        m = e.modelled
        latency = latency_model(m.profile, m.model, m.hardware, m.tensor_parallel, m.decode_axis)
        log.info("modelled engine: %r, time scale %g", latency, m.time_scale)
        return ModelledEngine(config, latency, m.time_scale)
    return Engine(config)


async def serve(cfg: MlsConfig) -> int:
    t0 = time.monotonic()
    engine = build_engine(cfg)
    kt = cfg.kv_transfer
    receiver, sender = make_endpoints(kt.transport, host=kt.host, port=kt.port,
                                      early_connect_wait_s=kt.early_connect_wait_s)
    kv_address = receiver.address()
    metrics = MlsMetrics(cfg.machine_id, cfg.role)
    metrics_port = start_metrics_endpoint(cfg.metrics_port, cfg.host, metrics.registry)

    service_box: list[MachineService] = []
    worker = EngineWorker(engine, cfg, lambda out: service_box[0].emit(out), metrics,
                          receiver=receiver, sender=sender)
    service = MachineService(cfg, engine, worker, kv_address)
    service_box.append(service)
    server = grpc.aio.server(options=[("grpc.max_receive_message_length", 64 * 2**20)])
    mlsd_pb2_grpc.add_MachineServiceServicer_to_server(service, server)
    lifecycle = Lifecycle(server, ("", SERVICE_NAME))
    port = server.add_insecure_port(f"{cfg.host}:{cfg.grpc_port}")
    await server.start()
    worker.start()

    # WATCHDOG=1 only while the worker thread lives: a dead engine thread gets the unit restarted.
    await lifecycle.serving({"machine_id": cfg.machine_id, "role": cfg.role, "grpc_port": port,
                             "metrics_port": metrics_port, "kv_address": kv_address.hex()},
                            cfg.watchdog_interval_s, alive=lambda: worker.alive)
    log.info("%s (%s) serving on %s:%d after %.1f s; KV %d blocks of %d tokens", cfg.machine_id,
             cfg.role, cfg.host, port, time.monotonic() - t0, engine.num_blocks, engine.kv.block_size)
    registration: Registration | None = None
    registration_task: asyncio.Task | None = None
    if cfg.cls_address is not None:
        advertise = cfg.advertise_address or f"{cfg.host}:{port}"
        if cfg.advertise_address is None and cfg.host in ("0.0.0.0", "::", ""):
            log.warning("host %r is not an address clsd can dial: set advertise_address", cfg.host)
        registration = Registration(cfg.cls_address, advertise, service.info, service.load_report,
                                    healthy=lambda: worker.alive, orphan_grace_s=cfg.orphan_grace_s,
                                    on_orphaned=lambda why: worker.abort_all(f"orphaned: {why}"))
        registration_task = asyncio.create_task(registration.run())

    await lifecycle.stop.wait()
    log.info("draining: finishing %d in-flight requests", len(worker.requests))
    service.draining = True
    if registration is not None:
        registration.report_now()  # clsd stops routing here at once, not a heartbeat later
    await lifecycle.draining()
    if not await wait_idle(lambda: worker.idle, cfg.drain_timeout_s):
        log.warning("drain timed out with %d requests in flight", len(worker.requests))
    # One more worker turn: the events of the last finished requests reach the streams first.
    await asyncio.wait_for(asyncio.wrap_future(worker.submit(lambda: None)), 5.0)
    await asyncio.sleep(0)
    lifecycle.close()
    if registration_task is not None:  # clsd has seen draining=true (or the RPC deadline passed)
        await registration.reported()
        registration_task.cancel()
        await asyncio.gather(registration_task, return_exceptions=True)
    service.close_streams()
    await server.stop(grace=2.0)
    worker.stop()
    receiver.close()
    sender.close()
    log.info("stopped")
    return 0


def main(argv: list[str] | None = None) -> int:
    cfg = load_daemon_config(MlsConfig, "mlsd", "Machine-level scheduler daemon.", argv)
    if isinstance(cfg, int):
        return cfg
    from engine.modelled import ProfileError

    try:
        return asyncio.run(serve(cfg))
    except ProfileError as e:  # engine.modelled.profile lacks the configured machine
        log.error("config error: engine.modelled: %s", e)
        return 2


if __name__ == "__main__":
    sys.exit(main())
