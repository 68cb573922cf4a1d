"""The Work stream's items and results, typed by their message (hand-written; not generated).

A WorkItem carries one request message in its `op` oneof and a WorkResult one reply in its `reply`
oneof. Both ends (clsd's cls/work_stream.py, mlsd's mls/work.py) go through these functions, so
which request goes with which reply is written once, and nothing dispatches on a field name:
1. clsd: `work_item(call_id, request)` wraps a request; the op is the request's type.
2. mlsd: `item_request(item)` unwraps it (None: an item without an op); the handler is chosen
   by the request's type; `work_result(call_id, reply)` wraps the handler's reply.
3. clsd: `result_reply(result)` unwraps the reply and `REPLY_TYPE[type(request)]` says which
   reply type the call expects.
"""

from __future__ import annotations

from google.protobuf.message import Message

from proto import mlsd_pb2 as pb

REPLY_TYPE: dict[type[Message], type[Message]] = {
    pb.AddDecodeRequest: pb.AddDecodeReply,
    pb.PrefillRequest: pb.PrefillReply,
    pb.GenerateRequest: pb.GenerateReply,
    pb.AbortRequest: pb.AbortReply,
}
"""Every request type the Work stream carries, and the reply it gets."""


def work_item(call_id: int, request: Message) -> pb.WorkItem:
    match request:
        case pb.AddDecodeRequest():
            return pb.WorkItem(call_id=call_id, add_decode=request)
        case pb.PrefillRequest():
            return pb.WorkItem(call_id=call_id, prefill=request)
        case pb.GenerateRequest():
            return pb.WorkItem(call_id=call_id, generate=request)
        case pb.AbortRequest():
            return pb.WorkItem(call_id=call_id, abort=request)
    raise TypeError(f"no Work op carries a {type(request).__name__}")


def item_request(item: pb.WorkItem) -> Message | None:
    match item.WhichOneof("op"):
        case "add_decode":
            return item.add_decode
        case "prefill":
            return item.prefill
        case "generate":
            return item.generate
        case "abort":
            return item.abort
    return None


def work_result(call_id: int, reply: Message) -> pb.WorkResult:
    match reply:
        case pb.AddDecodeReply():
            return pb.WorkResult(call_id=call_id, add_decode=reply)
        case pb.PrefillReply():
            return pb.WorkResult(call_id=call_id, prefill=reply)
        case pb.GenerateReply():
            return pb.WorkResult(call_id=call_id, generate=reply)
        case pb.AbortReply():
            return pb.WorkResult(call_id=call_id, abort=reply)
    raise TypeError(f"no Work reply is a {type(reply).__name__}")


def result_reply(result: pb.WorkResult) -> Message | None:
    match result.WhichOneof("reply"):
        case "add_decode":
            return result.add_decode
        case "prefill":
            return result.prefill
        case "generate":
            return result.generate
        case "abort":
            return result.abort
    return None
