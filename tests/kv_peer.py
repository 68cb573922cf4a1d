"""A misbehaving KV peer in its own process, for failure tests.

    python -m tests.kv_peer send ADDRESS_HEX REQUEST_ID NUM_TOKENS LAYERS_TO_SEND
        opens a TCP KV transfer (float32 SmolLM2 shape), sends that many layers, prints "sent"
        once the receiver has accepted the transfer, then hangs (never finishes) until killed.
    python -m tests.kv_peer receive REQUEST_ID NUM_TOKENS
        a receiver that prints its address, accepts the request and hangs inside the first
        layer (a stuck token machine) until killed.
"""

from __future__ import annotations

import sys
import threading
import time

import torch

from mls.kv.base import KVSpec, TransferState
from mls.kv.factory import make_receiver, make_sender


def spec(request_id: str, num_tokens: int) -> KVSpec:
    return KVSpec(request_id, 30, num_tokens, 3, 64, "float32")


class HangingSink:
    def __init__(self, s: KVSpec):
        self.buf = torch.empty(s.layer_shape)

    def layer_buffers(self, layer: int):
        return [self.buf]

    def layer_received(self, layer: int) -> None:
        threading.Event().wait()  # stuck forever, like a wedged peer


def main() -> None:
    mode = sys.argv[1]
    if mode == "send":
        address, rid, n, layers = bytes.fromhex(sys.argv[2]), sys.argv[3], int(sys.argv[4]), int(sys.argv[5])
        handle = make_sender("tcp").open(address, spec(rid, n), time.monotonic() + 600)
        for layer in range(layers):
            handle.send_layer(layer, torch.zeros(spec(rid, n).layer_shape))
        while handle.wait(0.01) == TransferState.WAITING:  # "sent" only once the receiver accepted
            pass
        print("sent", flush=True)
    else:
        rid, n = sys.argv[2], int(sys.argv[3])
        receiver = make_receiver("tcp")
        receiver.expect(spec(rid, n), HangingSink(spec(rid, n)), time.monotonic() + 600)
        print(receiver.address().hex(), flush=True)
    threading.Event().wait()


if __name__ == "__main__":
    main()
