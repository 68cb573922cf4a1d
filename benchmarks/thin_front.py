"""The thinnest front a Python gRPC stack allows: the peer clsd's added latency is measured
against in `benchmarks/cls_bench.py --part clsd`.

It serves clsd's own client API (ClientService.Generate, so the same SDK client calls it) and,
per request, makes one unary Prefill call to a prompt machine, round robin, and answers the first
token as the whole reply. No validation, routing state, token machine, timing or metrics: what
it adds over calling Prefill directly is one more Python gRPC hop (a server stream in, a unary
call out) on this host, the floor under anything clsd could add in this stack.

    python benchmarks/thin_front.py HOST:PORT [HOST:PORT ...]
prints {"grpc_port": N} on stdout once serving; stops on SIGTERM or SIGINT.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import signal
import sys
from pathlib import Path

import grpc

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from proto import clsd_pb2 as cpb  # noqa: E402
from proto import clsd_pb2_grpc, mlsd_pb2_grpc  # noqa: E402
from proto import mlsd_pb2 as mpb  # noqa: E402


class ThinFront(clsd_pb2_grpc.ClientServiceServicer):
    def __init__(self, prompt_addresses: list[str]):
        self.channels = [grpc.aio.insecure_channel(a) for a in prompt_addresses]
        self.stubs = [mlsd_pb2_grpc.MachineServiceStub(ch) for ch in self.channels]
        self.ids = itertools.count()

    async def Generate(self, request, context):
        i = next(self.ids)
        rid = request.request_id or f"thin-{i}"
        reply = await self.stubs[i % len(self.stubs)].Prefill(mpb.PrefillRequest(
            request=mpb.RequestSpec(request_id=rid, prompt_token_ids=request.prompt_token_ids,
                                    sampling=mpb.SamplingParams(max_tokens=request.max_tokens)),
            kv_address=b"thin-front"), timeout=30)
        yield cpb.GenerateResponse(request_id=rid, token_ids=[reply.first_token_id],
                                   finish_reason="length",
                                   num_prompt_tokens=len(request.prompt_token_ids))


async def serve(prompt_addresses: list[str]) -> None:
    server = grpc.aio.server()
    front = ThinFront(prompt_addresses)
    clsd_pb2_grpc.add_ClientServiceServicer_to_server(front, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    print(json.dumps({"grpc_port": port}), flush=True)
    await stop.wait()
    await server.stop(1.0)
    for ch in front.channels:
        await ch.close()


def main(argv: list[str] | None = None) -> int:
    addresses = sys.argv[1:] if argv is None else argv
    if not addresses:
        print("usage: thin_front.py HOST:PORT [HOST:PORT ...] (the prompt machines)", file=sys.stderr)
        return 2
    asyncio.run(serve(addresses))
    return 0


if __name__ == "__main__":
    sys.exit(main())
