"""KV transports (local, tcp, ucx, shm) behind one interface: bytes, concurrency, order, rejections,
deadlines, cancel/abort, a killed sender process, and a real two-process round trip."""

from __future__ import annotations

import importlib.util
import json
import math
import random
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from engine.shared_memory import SharedSegment
from mls.kv.base import KVSpec, TransferState
from mls.kv.factory import make_receiver, make_sender

DONE, FAILED, RECEIVING = TransferState.DONE, TransferState.FAILED, TransferState.RECEIVING
ROOT = Path(__file__).resolve().parents[2]
HAS_UCXX = importlib.util.find_spec("ucxx") is not None
NEEDS_UCXX = pytest.mark.skipif(not HAS_UCXX, reason="ucxx is not installed (pip install ucxx-cu12)")
TRANSPORTS = ["local", "tcp", pytest.param("ucx", marks=NEEDS_UCXX), "shm"]
NETWORK = ["tcp", pytest.param("ucx", marks=NEEDS_UCXX), "shm"]


def make_spec(request_id: str = "r1", num_tokens: int = 257, dtype: str = "bfloat16",
              num_layers: int = 30) -> KVSpec:
    return KVSpec(request_id, num_layers, num_tokens, 3, 64, dtype)


def layer_data(spec: KVSpec, layer: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed * 1000 + layer)
    return torch.randn(spec.layer_shape, generator=g).to(getattr(torch, spec.dtype))


class BlockSink:
    """Like the engine's import views: a layer lands in chunks of a bigger cache tensor, in
    shuffled order and of non-uniform sizes (16-token blocks, some partly used). The cache is in a
    shared-memory segment, as a token machine's is with transport shm (the others do not care)."""

    def __init__(self, spec: KVSpec, seed: int = 0):
        rng = random.Random(seed)
        sizes, left = [], spec.num_tokens
        while left:
            sizes.append(min(left, rng.choice([16, 16, 16, 5, 11])))
            left -= sizes[-1]
        blocks = rng.sample(range(len(sizes) + 4), len(sizes))
        shape = (spec.num_layers, (len(sizes) + 4) * 16, 2, spec.num_kv_heads, spec.head_dim)
        dtype = getattr(torch, spec.dtype)
        self.segment = SharedSegment(math.prod(shape) * dtype.itemsize)
        self.cache = self.segment.tensor(shape, dtype)
        self.cache.zero_()
        self.chunks = list(zip(blocks, sizes))
        self.received: list[int] = []

    def layer_buffers(self, layer: int) -> list[torch.Tensor]:
        cache = self.cache[layer]
        return [cache[b * 16: b * 16 + n] for b, n in self.chunks]

    def layer_received(self, layer: int) -> None:
        self.received.append(layer)

    def layer(self, layer: int) -> torch.Tensor:
        return torch.cat(self.layer_buffers(layer))


def wait_for(predicate, timeout_s: float = 5.0):
    """Polls until predicate() is truthy or the timeout passes; returns its last value."""
    end = time.monotonic() + timeout_s
    while not (value := predicate()) and time.monotonic() < end:
        time.sleep(0.005)
    return value


def send_all(handle, spec: KVSpec, order=None, seed: int = 0, first_token: int = 7) -> None:
    for i in order if order is not None else range(spec.num_layers):
        handle.send_layer(i, layer_data(spec, i, seed))
    handle.finish(first_token)


@pytest.fixture
def pair(request):
    receiver, sender = make_receiver(request.param), make_sender(request.param)
    yield receiver, sender
    sender.close()
    receiver.close()


def deadline(seconds: float = 10.0) -> float:
    return time.monotonic() + seconds


@pytest.mark.parametrize("pair", TRANSPORTS, indirect=True)
@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_round_trip_bytes_identical(pair, dtype):
    receiver, sender = pair
    spec = make_spec(dtype=dtype)
    sink = BlockSink(spec)
    receiver.expect(spec, sink, deadline())
    assert receiver.poll(spec.request_id).state == TransferState.WAITING
    handle = sender.open(receiver.address(), spec, deadline())
    send_all(handle, spec, first_token=12345)
    assert handle.wait(10) == DONE, handle.error
    status = receiver.poll(spec.request_id)
    assert (status.state, status.layers_received, status.first_token_id) == (DONE, 30, 12345)
    assert sorted(sink.received) == list(range(30))
    for i in range(30):
        assert torch.equal(sink.layer(i), layer_data(spec, i))


@pytest.mark.parametrize("pair", TRANSPORTS, indirect=True)
def test_on_ended_reports_done_and_failed_transfers_once_each(pair):
    """The owner is told when a transfer ends (mlsd's worker wakes on it instead of polling)."""
    receiver, sender = pair
    ended: list[tuple[str, TransferState]] = []
    woke = threading.Event()

    def on_ended(rid: str) -> None:
        ended.append((rid, receiver.poll(rid).state))  # already terminal when called
        woke.set()

    receiver.on_ended = on_ended
    ok, bad = make_spec("ok", num_tokens=32), make_spec("bad", num_tokens=32)
    receiver.expect(ok, BlockSink(ok), deadline())
    receiver.expect(bad, BlockSink(bad), deadline())
    send_all(sender.open(receiver.address(), ok, deadline()), ok)
    assert woke.wait(10) and ended == [("ok", DONE)]
    woke.clear()
    handle = sender.open(receiver.address(), bad, deadline())
    handle.send_layer(0, layer_data(bad, 0))
    assert wait_for(lambda: receiver.poll("bad").layers_received == 1)
    handle.abort("prefill failed")
    assert woke.wait(10) and ended == [("ok", DONE), ("bad", FAILED)]
    receiver.cancel("bad")  # already over: no second report
    receiver.cancel("ok")
    assert ended == [("ok", DONE), ("bad", FAILED)]


@pytest.mark.parametrize("pair", ["tcp", "shm"], indirect=True)
@pytest.mark.parametrize("taken", [5, 2, 0])
def test_finish_after_every_layer_left_is_written_by_the_caller(pair, taken, monkeypatch):
    """After a layerwise prefill only FINISH is left: finish() writes it on its own thread; what
    a full socket did not take (`taken` of 5 bytes), the handle's thread sends."""
    from mls.kv.control_sender import ControlSendHandle

    receiver, sender = pair
    written: list[bytes] = []
    real_write = ControlSendHandle._write_now

    def write_now(self, frame: bytes) -> int:
        n = (real_write(self, frame if taken == 5 else frame[:taken])) if taken else 0
        written.append((frame, n))
        return n

    monkeypatch.setattr(ControlSendHandle, "_write_now", write_now)
    spec = make_spec("direct", num_tokens=48)
    sink = BlockSink(spec)
    receiver.expect(spec, sink, deadline())
    handle = sender.open(receiver.address(), spec, deadline())
    for i in range(spec.num_layers):
        handle.send_layer(i, layer_data(spec, i))
    assert wait_for(lambda: receiver.poll("direct").layers_received == spec.num_layers)
    assert wait_for(lambda: handle._layers_sent == spec.num_layers)
    handle.finish(4321)
    assert handle.wait(10) == DONE, handle.error
    assert len(written) == 1, "finish() did not write FINISH itself"
    assert written[0][1] == taken, "the caller's non-blocking write did not go out"
    status = receiver.poll("direct")
    assert (status.state, status.first_token_id) == (DONE, 4321)
    assert all(torch.equal(sink.layer(i), layer_data(spec, i)) for i in range(spec.num_layers))


@pytest.mark.parametrize("pair", ["tcp", "shm"], indirect=True)
def test_direct_finish_to_a_receiver_that_cancelled_fails_with_its_reason(pair):
    receiver, sender = pair
    spec = make_spec("gone", num_tokens=16)
    receiver.expect(spec, BlockSink(spec), deadline())
    handle = sender.open(receiver.address(), spec, deadline())
    for i in range(spec.num_layers):
        handle.send_layer(i, layer_data(spec, i))
    assert wait_for(lambda: handle._layers_sent == spec.num_layers)
    receiver.cancel("gone")
    handle.finish(1)
    assert handle.wait(10) == FAILED and "cancel" in handle.error


@pytest.mark.parametrize("pair", TRANSPORTS, indirect=True)
def test_layers_out_of_order_counted_as_they_land(pair):
    receiver, sender = pair
    spec = make_spec(num_tokens=40)
    sink = BlockSink(spec, seed=3)
    receiver.expect(spec, sink, deadline())
    handle = sender.open(receiver.address(), spec, deadline())
    order = random.Random(1).sample(range(30), 30)
    for n, i in enumerate(order[:10], 1):
        handle.send_layer(i, layer_data(spec, i))
        assert wait_for(lambda n=n: receiver.poll(spec.request_id).layers_received == n)
    assert receiver.poll(spec.request_id).state == RECEIVING
    for i in order[10:]:
        handle.send_layer(i, layer_data(spec, i))
    handle.finish(3)
    assert handle.wait(10) == DONE, handle.error
    assert sink.received == order
    assert all(torch.equal(sink.layer(i), layer_data(spec, i)) for i in range(30))


@pytest.mark.parametrize("pair", TRANSPORTS, indirect=True)
def test_many_concurrent_transfers_to_one_receiver(pair):
    receiver, sender = pair
    specs = [make_spec(f"c{k}", num_tokens=17 + 9 * k, num_layers=6) for k in range(16)]
    sinks = [BlockSink(s, seed=k) for k, s in enumerate(specs)]
    for spec, sink in zip(specs, sinks):
        receiver.expect(spec, sink, deadline())
    handles = [sender.open(receiver.address(), s, deadline()) for s in specs]
    threads = [threading.Thread(target=send_all, args=(h, s), kwargs={"seed": k, "first_token": k})
               for k, (h, s) in enumerate(zip(handles, specs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for k, (h, spec, sink) in enumerate(zip(handles, specs, sinks)):
        assert h.wait(10) == DONE, h.error
        assert receiver.poll(spec.request_id).first_token_id == k
        assert all(torch.equal(sink.layer(i), layer_data(spec, i, seed=k)) for i in range(6))


@pytest.mark.parametrize("pair", TRANSPORTS, indirect=True)
def test_header_mismatch_rejected_naming_the_field_then_next_transfer_works(pair):
    receiver, sender = pair
    spec = make_spec("m1")
    receiver.expect(spec, BlockSink(spec), deadline())
    handle = sender.open(receiver.address(), make_spec("m1", num_tokens=256), deadline())
    assert handle.wait(5) == FAILED
    assert "num_tokens" in handle.error and "256" in handle.error
    status = receiver.poll("m1")
    assert status.state == FAILED and "num_tokens" in status.error
    spec2, sink2 = make_spec("m2", num_tokens=20), BlockSink(make_spec("m2", num_tokens=20))
    receiver.expect(spec2, sink2, deadline())
    handle2 = sender.open(receiver.address(), spec2, deadline())
    send_all(handle2, spec2)
    assert handle2.wait(10) == DONE, handle2.error
    assert torch.equal(sink2.layer(29), layer_data(spec2, 29))


@pytest.mark.parametrize("pair", TRANSPORTS, indirect=True)
def test_unknown_request_rejected(pair):
    receiver, sender = pair
    if hasattr(receiver, "_early_connect_wait_s"):
        receiver._early_connect_wait_s = 0.3  # how long a network receiver waits for expect()
    t0 = time.monotonic()
    handle = sender.open(receiver.address(), make_spec("nobody"), deadline())
    assert handle.wait(5) == FAILED and "not expected" in handle.error
    if hasattr(receiver, "_early_connect_wait_s"):
        assert time.monotonic() - t0 >= 0.3, "rejected before the early-connection wait ran out"
    assert receiver.poll("nobody").state == FAILED


@pytest.mark.parametrize("transport", NETWORK)
def test_a_sender_that_connects_before_expect_is_held_until_the_reservation(transport):
    """clsd sends decode and prefill work together: the prompt machine's sender may reach the
    token machine before its blocks are reserved; the receiver holds the connection till then."""
    receiver, sender = make_receiver(transport, early_connect_wait_s=10.0), make_sender(transport)
    try:
        spec = make_spec("early", num_tokens=40)
        handle = sender.open(receiver.address(), spec, deadline())
        for i in range(spec.num_layers):  # layerwise: queued while the receiver holds the header
            handle.send_layer(i, layer_data(spec, i))
        handle.finish(99)
        assert handle.wait(0.3) not in (DONE, FAILED)  # held, not rejected
        sink = BlockSink(spec)
        receiver.expect(spec, sink, deadline())
        assert handle.wait(10) == DONE, handle.error
        status = receiver.poll("early")
        assert (status.state, status.first_token_id) == (DONE, 99)
        assert all(torch.equal(sink.layer(i), layer_data(spec, i)) for i in range(spec.num_layers))
    finally:
        sender.close()
        receiver.close()


@pytest.mark.parametrize("transport", NETWORK)
def test_a_reservation_after_its_early_sender_was_refused_fails_at_once(transport):
    """Had the token machine queued the request for memory past the wait, the sender is gone:
    the reservation ends FAILED now, not at the end of its start window."""
    receiver, sender = make_receiver(transport, early_connect_wait_s=0.2), make_sender(transport)
    try:
        spec = make_spec("late", num_tokens=8)
        handle = sender.open(receiver.address(), spec, deadline())
        assert handle.wait(5) == FAILED and "not expected within 0.2 s" in handle.error
        receiver.expect(spec, BlockSink(spec), deadline(60))
        status = receiver.poll("late")
        assert status.state == FAILED and "refused" in status.error
        other = make_spec("fresh", num_tokens=8)  # nothing else is affected
        receiver.expect(other, BlockSink(other), deadline())
        send_all(sender.open(receiver.address(), other, deadline()), other)
        assert wait_for(lambda: receiver.poll("fresh").state == DONE)
    finally:
        sender.close()
        receiver.close()


@pytest.mark.parametrize("transport", NETWORK)
def test_closing_the_receiver_releases_a_held_early_sender(transport):
    receiver, sender = make_receiver(transport, early_connect_wait_s=30.0), make_sender(transport)
    try:
        handle = sender.open(receiver.address(), make_spec("held", num_tokens=8), deadline())
        assert handle.wait(0.3) not in (DONE, FAILED)
        t0 = time.monotonic()
        receiver.close()
        assert handle.wait(5) == FAILED and time.monotonic() - t0 < 5
    finally:
        sender.close()
        receiver.close()


@pytest.mark.parametrize("pair", TRANSPORTS, indirect=True)
def test_deadline_fails_both_sides_when_layers_never_come(pair):
    receiver, sender = pair
    spec = make_spec("late", num_tokens=16)
    sink = BlockSink(spec)  # made first: the budget below is measured at expect()
    start, budget = time.monotonic(), 0.6
    receiver.expect(spec, sink, start + budget)
    handle = sender.open(receiver.address(), spec, start + budget)
    for i in range(5):
        handle.send_layer(i, layer_data(spec, i))
    assert handle.wait(budget + 2) == FAILED
    status = wait_for(lambda: receiver.poll("late").state == FAILED and receiver.poll("late"), 2)
    assert time.monotonic() - start < budget + 1.0
    for error in (handle.error, status.error):  # the budget is measured at open()/expect()
        assert re.search(r"timed out after 0\.[56]\d s waiting for layer 5", error), error


@pytest.mark.parametrize("pair", TRANSPORTS, indirect=True)
def test_start_window_then_transfer_window(pair):
    """The sender must connect within the start window; from then on the transfer window counts,
    so a prefill that queued long on the prompt machine is not failed for it."""
    receiver, sender = pair
    spec = make_spec("slow-start", num_tokens=16, num_layers=6)
    sink = BlockSink(spec)
    receiver.expect(spec, sink, deadline(0.5), transfer_window_s=10.0)
    handle = sender.open(receiver.address(), spec, deadline(10.0))
    handle.send_layer(0, layer_data(spec, 0))
    assert wait_for(lambda: receiver.poll("slow-start").state == RECEIVING, 5)
    time.sleep(0.8)  # the layers keep coming after the start window has closed
    for i in range(1, spec.num_layers):
        handle.send_layer(i, layer_data(spec, i))
    handle.finish(3)
    assert handle.wait(10) == DONE
    assert wait_for(lambda: receiver.poll("slow-start").state == DONE, 5)

    never = make_spec("never-connects", num_tokens=16)
    never_sink = BlockSink(never)
    start = time.monotonic()
    receiver.expect(never, never_sink, start + 0.3, transfer_window_s=10.0)
    status = wait_for(lambda: (st := receiver.poll("never-connects")).state == FAILED and st, 5)
    assert status and time.monotonic() - start < 2.0
    assert "waiting for the sender to connect" in status.error, status.error


@pytest.mark.parametrize("pair", TRANSPORTS, indirect=True)
def test_sender_to_a_dead_address_fails_within_the_deadline(pair):
    receiver, sender = pair
    if receiver.transport == "local":
        address = b"local:999999"
    else:
        with socket.socket() as s:  # a port nobody listens on any more
            s.bind(("127.0.0.1", 0))
            dead = f"127.0.0.1:{s.getsockname()[1]}".encode()
        address = dead + receiver.address()[len(receiver.address().split(b"|")[0]):]
    start = time.monotonic()
    handle = sender.open(address, make_spec(), start + 1.0)
    assert handle.wait(3) == FAILED and time.monotonic() - start < 1.5
    assert handle.error


@pytest.mark.parametrize("transport", NETWORK)
def test_silent_peer_times_out_at_the_deadline(transport):
    """A peer that accepts the connection but never answers (hung process)."""
    sender = make_sender(transport)
    with socket.create_server(("127.0.0.1", 0)) as silent:
        address = f"127.0.0.1:{silent.getsockname()[1]}".encode() + (b"|x" if transport == "ucx" else b"")
        start = time.monotonic()
        handle = sender.open(address, make_spec(), start + 0.5)
        assert handle.wait(3) == FAILED
        assert time.monotonic() - start < 1.5
        assert re.search(r"timed out after 0\.[45]\d s waiting for the receiver to accept", handle.error)
    sender.close()


@pytest.mark.parametrize("pair", TRANSPORTS, indirect=True)
def test_receiver_cancel_mid_transfer_fails_sender_and_drops_late_layers(pair):
    receiver, sender = pair
    spec = make_spec("cx", num_tokens=64)
    sink = BlockSink(spec)
    receiver.expect(spec, sink, deadline())
    handle = sender.open(receiver.address(), spec, deadline())
    for i in range(3):
        handle.send_layer(i, layer_data(spec, i))
    assert wait_for(lambda: receiver.poll("cx").layers_received == 3)
    receiver.cancel("cx")
    for i in range(3, 30):
        handle.send_layer(i, layer_data(spec, i))
    handle.finish(1)
    assert handle.wait(5) == FAILED and "cancel" in handle.error
    assert receiver.poll("cx").state == FAILED  # forgotten: "not expected here"
    assert sorted(sink.received) == [0, 1, 2]
    assert not sink.cache[3:].any(), "a layer landed after cancel()"


@pytest.mark.parametrize("pair", TRANSPORTS, indirect=True)
def test_sender_abort_fails_the_receiver(pair):
    receiver, sender = pair
    spec = make_spec("ab", num_tokens=32)
    receiver.expect(spec, BlockSink(spec), deadline())
    handle = sender.open(receiver.address(), spec, deadline())
    handle.send_layer(0, layer_data(spec, 0))
    assert wait_for(lambda: receiver.poll("ab").layers_received == 1)
    handle.abort("prefill failed")
    assert handle.wait(1) == FAILED and "prefill failed" in handle.error
    status = wait_for(lambda: receiver.poll("ab").state == FAILED and receiver.poll("ab"), 3)
    assert status and status.error


@pytest.mark.parametrize("pair", TRANSPORTS, indirect=True)
def test_send_layer_checks_its_input(pair):
    receiver, sender = pair
    spec = make_spec("bad")
    receiver.expect(spec, BlockSink(spec), deadline())
    handle = sender.open(receiver.address(), spec, deadline())
    with pytest.raises(ValueError, match="outside"):
        handle.send_layer(30, layer_data(spec, 0))
    with pytest.raises(ValueError, match="header says"):
        handle.send_layer(0, layer_data(make_spec(num_tokens=5), 0))
    handle.send_layer(0, layer_data(spec, 0))
    with pytest.raises(ValueError, match="twice"):
        handle.send_layer(0, layer_data(spec, 0))
    handle.abort("test over")


@pytest.mark.parametrize("transport", NETWORK)
def test_garbage_and_malformed_headers_are_rejected(transport):
    from mls.kv.wire import PREAMBLE, read_status

    receiver = make_receiver(transport)
    host, port = receiver.address().split(b"|")[0].decode().rsplit(":", 1)
    receiver.expect(make_spec("t"), BlockSink(make_spec("t")), deadline())
    bad_tag = json.dumps({**make_spec("t").to_dict(), "tag": 5}).encode()
    cases = [(b"GET / HTTP/1.1\r\n\r\n", "bad magic"),
             (PREAMBLE.pack(receiver.magic, 1, 5) + b"{nope", "malformed KV header"),
             (PREAMBLE.pack(receiver.magic, 1, 2) + b"{}", "lacks field"),
             (PREAMBLE.pack(receiver.magic, 9, 2) + b"{}", "version 9")]
    if transport == "ucx":
        cases.append((PREAMBLE.pack(receiver.magic, 1, len(bad_tag)) + bad_tag, "bad UCX tag"))
    for payload, expected in cases:
        with socket.create_connection((host, int(port)), timeout=5) as s:
            s.sendall(payload)
            ok, message = read_status(s, time.monotonic() + 5)
            assert not ok and expected in message
    receiver.close()


# -- real processes --------------------------------------------------------------------------

SENDER_SCRIPT = """
import sys, time
sys.path.insert(0, sys.argv[3])
from tests.e2e.test_kv_transports import layer_data, make_spec, send_all
from mls.kv.factory import make_sender
sender = make_sender(sys.argv[1])
address = bytes.fromhex(sys.argv[2])
spec = make_spec("whole", num_tokens=257)
handle = sender.open(address, spec, time.monotonic() + 20)
send_all(handle, spec, seed=5, first_token=99)
print("whole", handle.wait(20).name, handle.error, flush=True)
spec = make_spec("partial", num_tokens=100)
handle = sender.open(address, spec, time.monotonic() + 20)
for i in range(4):
    handle.send_layer(i, layer_data(spec, i))
print("partial sent", flush=True)
time.sleep(60)
"""


@pytest.mark.parametrize("transport", NETWORK)
def test_two_processes_round_trip_then_sender_killed_mid_transfer(transport):
    receiver, sender = make_receiver(transport), make_sender(transport)
    whole, partial = make_spec("whole", num_tokens=257), make_spec("partial", num_tokens=100)
    sinks = {"whole": BlockSink(whole), "partial": BlockSink(partial)}
    receiver.expect(whole, sinks["whole"], deadline(30))
    budget = 8.0
    receiver.expect(partial, sinks["partial"], deadline(budget))
    proc = subprocess.Popen([sys.executable, "-c", SENDER_SCRIPT, transport, receiver.address().hex(),
                             str(ROOT)], stdout=subprocess.PIPE, text=True, cwd=ROOT)
    try:
        assert proc.stdout.readline().split() == ["whole", "DONE", "None"]
        assert receiver.poll("whole").first_token_id == 99
        assert all(torch.equal(sinks["whole"].layer(i), layer_data(whole, i, seed=5)) for i in range(30))
        assert proc.stdout.readline().strip() == "partial sent"
        assert wait_for(lambda: receiver.poll("partial").layers_received == 4)
        killed_at = time.monotonic()
        proc.send_signal(signal.SIGKILL)
        status = wait_for(lambda: receiver.poll("partial").state == FAILED and receiver.poll("partial"), budget)
        assert status and time.monotonic() - killed_at < 2.0, "the control channel saw the peer die"
        assert "sender closed the connection" in status.error
    finally:
        proc.kill()
        proc.wait()
    spec = make_spec("after", num_tokens=33)  # the receiver keeps serving
    sink = BlockSink(spec)
    receiver.expect(spec, sink, deadline())
    handle = sender.open(receiver.address(), spec, deadline())
    send_all(handle, spec)
    assert handle.wait(10) == DONE, handle.error
    sender.close()
    receiver.close()


def test_factory_names_the_allowed_transports():
    with pytest.raises(ValueError, match="local, tcp, ucx, shm"):
        make_receiver("rdma")
    with pytest.raises(ValueError, match="local, tcp, ucx, shm"):
        make_sender("pipe")
    assert make_sender("local").transport == "local"


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_finished_transfers_are_forgotten_after_the_retention_time(transport):
    receiver, sender = make_receiver(transport, retain_finished_s=0.0), make_sender(transport)
    spec = make_spec("old", num_tokens=4, num_layers=2)
    receiver.expect(spec, BlockSink(spec), deadline())
    handle = sender.open(receiver.address(), spec, deadline())
    send_all(handle, spec)
    assert handle.wait(10) == DONE and receiver.poll("old").state == DONE
    receiver.expect(make_spec("new"), BlockSink(make_spec("new")), deadline())
    assert "not expected" in receiver.poll("old").error
    sender.close()
    receiver.close()


# -- shm: the sender writes into the receiver's shared-memory segment -------------------------


class PlainSink(BlockSink):
    """A sink in ordinary (private) memory: the shm transport must fall back to socket bytes."""

    def __init__(self, spec: KVSpec):
        super().__init__(spec)
        self.cache = torch.zeros_like(self.cache)
        self.segment.close()


def test_shm_writes_straight_into_reserved_blocks_and_nowhere_else():
    receiver, sender = make_receiver("shm"), make_sender("shm")
    try:
        for k, sink_cls in enumerate((BlockSink, PlainSink)):
            spec = make_spec(f"s{k}", num_tokens=300)
            sink = sink_cls(spec, seed=k) if sink_cls is BlockSink else sink_cls(spec)
            receiver.expect(spec, sink, deadline())
            handle = sender.open(receiver.address(), spec, deadline())
            send_all(handle, spec, seed=k, first_token=41)
            assert handle.wait(10) == DONE, handle.error
            assert handle.mode == ("shm" if sink_cls is BlockSink else "inline")
            assert receiver.poll(spec.request_id).first_token_id == 41
            assert all(torch.equal(sink.layer(i), layer_data(spec, i, seed=k)) for i in range(30))
            unused = sorted(set(range(sink.cache.shape[1] // 16)) - {b for b, _ in sink.chunks})
            for b, n in [(b, 0) for b in unused] + sink.chunks:  # reserved tails and spare blocks
                assert not sink.cache[:, b * 16 + n: b * 16 + 16].any(), f"bytes outside block {b}'s range"
    finally:
        sender.close()
        receiver.close()


def test_shm_sender_on_another_host_gets_bytes_over_the_socket(monkeypatch):
    from mls.kv import shm

    monkeypatch.setattr(shm.ShmSendHandle, "_header",
                        lambda self: {**self.spec.to_dict(), "host_id": "another-boot/1:2"})
    receiver, sender = make_receiver("shm"), make_sender("shm")
    spec = make_spec("far", num_tokens=40)
    sink = BlockSink(spec)
    receiver.expect(spec, sink, deadline())
    handle = sender.open(receiver.address(), spec, deadline())
    send_all(handle, spec)
    assert handle.wait(10) == DONE, handle.error
    assert handle.mode == "inline"
    assert all(torch.equal(sink.layer(i), layer_data(spec, i)) for i in range(30))
    sender.close()
    receiver.close()


def _fake_receiver(placement: bytes) -> socket.socket:
    """Accepts one shm sender, then hands it `placement` (raw bytes after the length prefix)."""
    from mls.kv.shm import LENGTH, MAGIC
    from mls.kv.wire import encode_status, read_preamble

    server = socket.create_server(("127.0.0.1", 0))

    def serve():
        conn, _ = server.accept()
        with conn:
            read_preamble(conn, MAGIC, time.monotonic() + 5)
            conn.sendall(encode_status(True, "accepted") + LENGTH.pack(len(placement)) + placement)
            try:
                conn.recv(1)  # until the sender gives up
            except OSError:
                pass

    threading.Thread(target=serve, daemon=True).start()
    return server


def test_shm_sender_refuses_placements_outside_the_reservation_and_writes_nothing():
    spec = make_spec("evil", num_tokens=32, num_layers=2)
    layer = spec.layer_nbytes
    segment = SharedSegment(4 * layer)
    segment.bytes.fill_(0x5A)
    good = {"mode": "shm", "segment": segment.name, "segment_bytes": 4 * layer, "window_s": 5.0,
            "spans": [[0, layer]], "layer_offsets": [0, 2 * layer]}
    cases = [
        ({"layer_offsets": [0, 3 * layer + 1]}, "outside the segment of"),
        ({"layer_offsets": [-16, layer]}, "outside the segment of"),
        ({"layer_offsets": [0, layer // 2]}, "overlap"),
        ({"spans": [[0, layer - 768]]}, "hold"),
        ({"segment": "../../etc/passwd"}, "not a shared-memory segment name"),
        ({"segment": "mls-kv-1-000000000000"}, "does not exist"),
        ({"segment_bytes": 8 * layer}, "the file has"),
        ({"layer_offsets": [0]}, "layer_offsets must be 2 integers"),
        ({"spans": [[0, "x"]]}, "is not [offset, nbytes]"),
        ({"window_s": -1}, "window_s"),
        ({"mode": "rdma"}, "malformed placement"),
    ]
    sender = make_sender("shm")
    try:
        for change, expected in cases:
            server = _fake_receiver(json.dumps({**good, **change}).encode())
            address = f"127.0.0.1:{server.getsockname()[1]}".encode()
            handle = sender.open(address, spec, deadline(5))
            send_all(handle, spec)
            assert handle.wait(5) == FAILED, change
            assert expected in handle.error, (change, handle.error)
            assert bool((segment.bytes == 0x5A).all()), f"{change}: bytes were written"
            server.close()
        server = _fake_receiver(b"{not json")
        handle = sender.open(f"127.0.0.1:{server.getsockname()[1]}".encode(), spec, deadline(5))
        assert handle.wait(5) == FAILED and "malformed placement" in handle.error
        server.close()
    finally:
        sender.close()
        segment.close()


def test_shm_receiver_refuses_a_header_without_a_host_id():
    from mls.kv.wire import encode_preamble, read_status

    receiver = make_receiver("shm")
    spec = make_spec("h")
    receiver.expect(spec, BlockSink(spec), deadline())
    host, port = receiver.address().decode().rsplit(":", 1)
    for header, expected in ((spec.to_dict(), "host_id"), ({**spec.to_dict(), "host_id": 7}, "got 7")):
        with socket.create_connection((host, int(port)), timeout=5) as s:
            s.sendall(encode_preamble(receiver.magic, header))
            ok, message = read_status(s, time.monotonic() + 5)
            assert not ok and expected in message, message
    assert receiver.poll("h").state == TransferState.WAITING  # a bad header claims nothing
    receiver.close()


SEGMENT_OWNER = """
import sys, time
sys.path.insert(0, sys.argv[1])
from engine.shared_memory import SharedSegment
seg = SharedSegment(1 << 20)
print(seg.path, flush=True)
time.sleep(60)
"""


def test_shared_segments_are_lazy_unlinked_on_close_and_swept_after_a_kill():
    import os

    seg = SharedSegment(64 * 2**20)
    assert os.stat(seg.path).st_blocks == 0, "creating a segment must not touch its pages"
    seg.tensor((16 * 2**20,), torch.float32)[:1024].fill_(1.0)
    assert 0 < os.stat(seg.path).st_blocks * 512 < 2**20
    path = seg.path
    seg.close()
    assert not os.path.exists(path)
    with pytest.raises(MemoryError, match="does not fit"):
        SharedSegment(1 << 60)
    proc = subprocess.Popen([sys.executable, "-c", SEGMENT_OWNER, str(ROOT)], stdout=subprocess.PIPE,
                            text=True)
    try:
        orphan = proc.stdout.readline().strip()
        fresh = SharedSegment(4096)  # the owner is alive: its segment stays
        assert os.path.exists(orphan)
        fresh.close()
        proc.kill()
        proc.wait()
        assert os.path.exists(orphan), "SIGKILL runs no clean-up"
        fresh = SharedSegment(4096)  # the next segment sweeps the dead owner's
        assert not os.path.exists(orphan)
        fresh.close()
    finally:
        proc.kill()
        proc.wait()
