"""A real cluster for tests: one clsd process and mlsd processes that register with it.

1. `ClsdProc` starts `python -m cls.clsd` with a config on port 0 and reads its READY line.
2. `Cluster.start()` starts clsd, then each machine with `cls_address` pointing at it, then waits
   (polling the admin API) until every machine is registered.
3. `Cluster.stop()` stops the machines, then clsd (SIGTERM: the drain path).
"""

from __future__ import annotations

import time
from pathlib import Path

import grpc

from proto import clsd_pb2 as pb
from proto import clsd_pb2_grpc
from tests.mls_driver import DaemonProc, MachineProc

ADMIN_TOKEN = "test-admin-token"


class ClsdProc(DaemonProc):
    module = "cls.clsd"

    def __init__(self, tmp_dir: Path, config: dict):
        self.token_file = tmp_dir / "admin-token"
        self.token_file.write_text(ADMIN_TOKEN + "\n")
        config = {"grpc_port": 0, "metrics_port": 0, "admin_token_file": str(self.token_file), **config}
        super().__init__(tmp_dir, "clsd", config)


def machine_config(model_dir, machine_id: str, role: str, transport: str = "tcp", **engine) -> dict:
    return {
        "machine_id": machine_id, "role": role, "drain_timeout_s": 20,
        "engine": {"model": str(model_dir), "dtype": "float32", "block_size": 16,
                   "kv_cache_bytes": 128 * 2**20, **engine},
        "scheduler": {"prompt_token_cap": 512, "max_queue_len": 256},
        "kv_transfer": {"transport": transport, "layerwise_min_prompt_tokens": 64, "timeout_s": 20},
    }


class Cluster:
    def __init__(self, tmp_dir: Path, model_dir, machines: list[tuple[str, str]], clsd: dict | None = None,
                 engine: dict | None = None, machine: dict | None = None):
        """`engine`: keys merged into every machine's engine section; `machine`: top-level keys
        of every machine's config."""
        self.tmp_dir, self.model_dir, self.engine = tmp_dir, model_dir, engine or {}
        self.machine = machine or {}
        self.clsd = ClsdProc(tmp_dir, {"model": str(model_dir), "lease_ttl_s": 3.0,
                                       "heartbeat_interval_s": 0.3, **(clsd or {})})
        self.specs = machines
        self.machines: dict[str, MachineProc] = {}

    def start(self, timeout_s: float = 120.0) -> Cluster:
        try:
            self.clsd.start()
            for mid, role in self.specs:
                cfg = {**machine_config(self.model_dir, mid, role, **self.engine), **self.machine}
                cfg["cls_address"] = self.clsd.address
                self.machines[mid] = MachineProc(self.tmp_dir, mid, cfg).start()
            self.wait_registered(timeout_s)
        except BaseException:
            self.stop()
            raise
        return self

    def wait_registered(self, timeout_s: float, count: int | None = None) -> None:
        want = len(self.specs) if count is None else count
        deadline = time.monotonic() + timeout_s
        while True:
            ids = [m.machine_id for m in self.admin("ListMachines", pb.ListMachinesRequest()).machines]
            if len(ids) == want:
                return
            if time.monotonic() > deadline:
                raise TimeoutError(f"{len(ids)} of {want} machines registered:\n{self.clsd.log()[-3000:]}")
            time.sleep(0.1)

    def admin(self, method: str, request, token: str | None = ADMIN_TOKEN):
        with grpc.insecure_channel(self.clsd.address) as ch:
            stub = clsd_pb2_grpc.AdminServiceStub(ch)
            md = [("authorization", f"Bearer {token}")] if token else []
            return getattr(stub, method)(request, metadata=md, timeout=10)

    def stop(self) -> None:
        for m in self.machines.values():
            if m.proc is not None and m.proc.poll() is None:
                m.stop()
        if self.clsd.proc is not None:
            self.clsd.stop()

    def logs(self) -> str:
        return "\n".join([f"--- clsd\n{self.clsd.log()[-4000:]}"] +
                         [f"--- {mid}\n{m.log()[-2000:]}" for mid, m in self.machines.items()])
