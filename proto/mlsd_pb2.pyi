from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Role(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    ROLE_UNSPECIFIED: _ClassVar[Role]
    PROMPT: _ClassVar[Role]
    TOKEN: _ClassVar[Role]
    MIXED: _ClassVar[Role]
ROLE_UNSPECIFIED: Role
PROMPT: Role
TOKEN: Role
MIXED: Role

class SamplingParams(_message.Message):
    __slots__ = ("max_tokens", "temperature", "top_k", "top_p", "seed", "stop_token_ids", "ignore_eos")
    MAX_TOKENS_FIELD_NUMBER: _ClassVar[int]
    TEMPERATURE_FIELD_NUMBER: _ClassVar[int]
    TOP_K_FIELD_NUMBER: _ClassVar[int]
    TOP_P_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    STOP_TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    IGNORE_EOS_FIELD_NUMBER: _ClassVar[int]
    max_tokens: int
    temperature: float
    top_k: int
    top_p: float
    seed: int
    stop_token_ids: _containers.RepeatedScalarFieldContainer[int]
    ignore_eos: bool
    def __init__(self, max_tokens: _Optional[int] = ..., temperature: _Optional[float] = ..., top_k: _Optional[int] = ..., top_p: _Optional[float] = ..., seed: _Optional[int] = ..., stop_token_ids: _Optional[_Iterable[int]] = ..., ignore_eos: _Optional[bool] = ...) -> None: ...

class RequestSpec(_message.Message):
    __slots__ = ("request_id", "prompt_token_ids", "sampling")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    PROMPT_TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    SAMPLING_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    prompt_token_ids: _containers.RepeatedScalarFieldContainer[int]
    sampling: SamplingParams
    def __init__(self, request_id: _Optional[str] = ..., prompt_token_ids: _Optional[_Iterable[int]] = ..., sampling: _Optional[_Union[SamplingParams, _Mapping]] = ...) -> None: ...

class PrefillRequest(_message.Message):
    __slots__ = ("request", "kv_address", "transfer_timeout_s")
    REQUEST_FIELD_NUMBER: _ClassVar[int]
    KV_ADDRESS_FIELD_NUMBER: _ClassVar[int]
    TRANSFER_TIMEOUT_S_FIELD_NUMBER: _ClassVar[int]
    request: RequestSpec
    kv_address: bytes
    transfer_timeout_s: float
    def __init__(self, request: _Optional[_Union[RequestSpec, _Mapping]] = ..., kv_address: _Optional[bytes] = ..., transfer_timeout_s: _Optional[float] = ...) -> None: ...

class PrefillReply(_message.Message):
    __slots__ = ("request_id", "first_token_id", "kv_mode", "queue_s", "prefill_s")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    FIRST_TOKEN_ID_FIELD_NUMBER: _ClassVar[int]
    KV_MODE_FIELD_NUMBER: _ClassVar[int]
    QUEUE_S_FIELD_NUMBER: _ClassVar[int]
    PREFILL_S_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    first_token_id: int
    kv_mode: str
    queue_s: float
    prefill_s: float
    def __init__(self, request_id: _Optional[str] = ..., first_token_id: _Optional[int] = ..., kv_mode: _Optional[str] = ..., queue_s: _Optional[float] = ..., prefill_s: _Optional[float] = ...) -> None: ...

class AddDecodeRequest(_message.Message):
    __slots__ = ("request", "transfer_timeout_s")
    REQUEST_FIELD_NUMBER: _ClassVar[int]
    TRANSFER_TIMEOUT_S_FIELD_NUMBER: _ClassVar[int]
    request: RequestSpec
    transfer_timeout_s: float
    def __init__(self, request: _Optional[_Union[RequestSpec, _Mapping]] = ..., transfer_timeout_s: _Optional[float] = ...) -> None: ...

class AddDecodeReply(_message.Message):
    __slots__ = ("reserved",)
    RESERVED_FIELD_NUMBER: _ClassVar[int]
    reserved: bool
    def __init__(self, reserved: _Optional[bool] = ...) -> None: ...

class GenerateRequest(_message.Message):
    __slots__ = ("request",)
    REQUEST_FIELD_NUMBER: _ClassVar[int]
    request: RequestSpec
    def __init__(self, request: _Optional[_Union[RequestSpec, _Mapping]] = ...) -> None: ...

class GenerateReply(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class AbortRequest(_message.Message):
    __slots__ = ("request_id",)
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    def __init__(self, request_id: _Optional[str] = ...) -> None: ...

class AbortReply(_message.Message):
    __slots__ = ("found",)
    FOUND_FIELD_NUMBER: _ClassVar[int]
    found: bool
    def __init__(self, found: _Optional[bool] = ...) -> None: ...

class StreamEventsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class TokenDelta(_message.Message):
    __slots__ = ("request_id", "index", "token_id")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    INDEX_FIELD_NUMBER: _ClassVar[int]
    TOKEN_ID_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    index: int
    token_id: int
    def __init__(self, request_id: _Optional[str] = ..., index: _Optional[int] = ..., token_id: _Optional[int] = ...) -> None: ...

class RequestEvent(_message.Message):
    __slots__ = ("request_id", "kind", "finish_reason", "message", "num_output_tokens")
    class Kind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
        __slots__ = ()
        KIND_UNSPECIFIED: _ClassVar[RequestEvent.Kind]
        RESERVED: _ClassVar[RequestEvent.Kind]
        FINISHED: _ClassVar[RequestEvent.Kind]
        FAILED: _ClassVar[RequestEvent.Kind]
        ABORTED: _ClassVar[RequestEvent.Kind]
    KIND_UNSPECIFIED: RequestEvent.Kind
    RESERVED: RequestEvent.Kind
    FINISHED: RequestEvent.Kind
    FAILED: RequestEvent.Kind
    ABORTED: RequestEvent.Kind
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    FINISH_REASON_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    NUM_OUTPUT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    kind: RequestEvent.Kind
    finish_reason: str
    message: str
    num_output_tokens: int
    def __init__(self, request_id: _Optional[str] = ..., kind: _Optional[_Union[RequestEvent.Kind, str]] = ..., finish_reason: _Optional[str] = ..., message: _Optional[str] = ..., num_output_tokens: _Optional[int] = ...) -> None: ...

class MachineEvents(_message.Message):
    __slots__ = ("tokens", "events")
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    EVENTS_FIELD_NUMBER: _ClassVar[int]
    tokens: _containers.RepeatedCompositeFieldContainer[TokenDelta]
    events: _containers.RepeatedCompositeFieldContainer[RequestEvent]
    def __init__(self, tokens: _Optional[_Iterable[_Union[TokenDelta, _Mapping]]] = ..., events: _Optional[_Iterable[_Union[RequestEvent, _Mapping]]] = ...) -> None: ...

class WorkItem(_message.Message):
    __slots__ = ("call_id", "add_decode", "prefill", "generate", "abort")
    CALL_ID_FIELD_NUMBER: _ClassVar[int]
    ADD_DECODE_FIELD_NUMBER: _ClassVar[int]
    PREFILL_FIELD_NUMBER: _ClassVar[int]
    GENERATE_FIELD_NUMBER: _ClassVar[int]
    ABORT_FIELD_NUMBER: _ClassVar[int]
    call_id: int
    add_decode: AddDecodeRequest
    prefill: PrefillRequest
    generate: GenerateRequest
    abort: AbortRequest
    def __init__(self, call_id: _Optional[int] = ..., add_decode: _Optional[_Union[AddDecodeRequest, _Mapping]] = ..., prefill: _Optional[_Union[PrefillRequest, _Mapping]] = ..., generate: _Optional[_Union[GenerateRequest, _Mapping]] = ..., abort: _Optional[_Union[AbortRequest, _Mapping]] = ...) -> None: ...

class WorkBatch(_message.Message):
    __slots__ = ("items",)
    ITEMS_FIELD_NUMBER: _ClassVar[int]
    items: _containers.RepeatedCompositeFieldContainer[WorkItem]
    def __init__(self, items: _Optional[_Iterable[_Union[WorkItem, _Mapping]]] = ...) -> None: ...

class WorkResult(_message.Message):
    __slots__ = ("call_id", "code", "message", "add_decode", "prefill", "generate", "abort")
    CALL_ID_FIELD_NUMBER: _ClassVar[int]
    CODE_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    ADD_DECODE_FIELD_NUMBER: _ClassVar[int]
    PREFILL_FIELD_NUMBER: _ClassVar[int]
    GENERATE_FIELD_NUMBER: _ClassVar[int]
    ABORT_FIELD_NUMBER: _ClassVar[int]
    call_id: int
    code: int
    message: str
    add_decode: AddDecodeReply
    prefill: PrefillReply
    generate: GenerateReply
    abort: AbortReply
    def __init__(self, call_id: _Optional[int] = ..., code: _Optional[int] = ..., message: _Optional[str] = ..., add_decode: _Optional[_Union[AddDecodeReply, _Mapping]] = ..., prefill: _Optional[_Union[PrefillReply, _Mapping]] = ..., generate: _Optional[_Union[GenerateReply, _Mapping]] = ..., abort: _Optional[_Union[AbortReply, _Mapping]] = ...) -> None: ...

class WorkResults(_message.Message):
    __slots__ = ("results",)
    RESULTS_FIELD_NUMBER: _ClassVar[int]
    results: _containers.RepeatedCompositeFieldContainer[WorkResult]
    def __init__(self, results: _Optional[_Iterable[_Union[WorkResult, _Mapping]]] = ...) -> None: ...

class LoadRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class LoadReport(_message.Message):
    __slots__ = ("machine_id", "role", "prompt_queue_len", "pending_prompt_tokens", "decode_queue_len", "num_running", "pending_decode_tokens", "kv_blocks_used", "kv_blocks_free", "draining")
    MACHINE_ID_FIELD_NUMBER: _ClassVar[int]
    ROLE_FIELD_NUMBER: _ClassVar[int]
    PROMPT_QUEUE_LEN_FIELD_NUMBER: _ClassVar[int]
    PENDING_PROMPT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    DECODE_QUEUE_LEN_FIELD_NUMBER: _ClassVar[int]
    NUM_RUNNING_FIELD_NUMBER: _ClassVar[int]
    PENDING_DECODE_TOKENS_FIELD_NUMBER: _ClassVar[int]
    KV_BLOCKS_USED_FIELD_NUMBER: _ClassVar[int]
    KV_BLOCKS_FREE_FIELD_NUMBER: _ClassVar[int]
    DRAINING_FIELD_NUMBER: _ClassVar[int]
    machine_id: str
    role: Role
    prompt_queue_len: int
    pending_prompt_tokens: int
    decode_queue_len: int
    num_running: int
    pending_decode_tokens: int
    kv_blocks_used: int
    kv_blocks_free: int
    draining: bool
    def __init__(self, machine_id: _Optional[str] = ..., role: _Optional[_Union[Role, str]] = ..., prompt_queue_len: _Optional[int] = ..., pending_prompt_tokens: _Optional[int] = ..., decode_queue_len: _Optional[int] = ..., num_running: _Optional[int] = ..., pending_decode_tokens: _Optional[int] = ..., kv_blocks_used: _Optional[int] = ..., kv_blocks_free: _Optional[int] = ..., draining: _Optional[bool] = ...) -> None: ...

class InfoRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class MachineInfo(_message.Message):
    __slots__ = ("machine_id", "role", "model", "dtype", "max_model_len", "vocab_size", "kv_block_size", "kv_num_blocks", "kv_transport", "kv_address", "num_layers", "num_kv_heads", "head_dim")
    MACHINE_ID_FIELD_NUMBER: _ClassVar[int]
    ROLE_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    MAX_MODEL_LEN_FIELD_NUMBER: _ClassVar[int]
    VOCAB_SIZE_FIELD_NUMBER: _ClassVar[int]
    KV_BLOCK_SIZE_FIELD_NUMBER: _ClassVar[int]
    KV_NUM_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    KV_TRANSPORT_FIELD_NUMBER: _ClassVar[int]
    KV_ADDRESS_FIELD_NUMBER: _ClassVar[int]
    NUM_LAYERS_FIELD_NUMBER: _ClassVar[int]
    NUM_KV_HEADS_FIELD_NUMBER: _ClassVar[int]
    HEAD_DIM_FIELD_NUMBER: _ClassVar[int]
    machine_id: str
    role: Role
    model: str
    dtype: str
    max_model_len: int
    vocab_size: int
    kv_block_size: int
    kv_num_blocks: int
    kv_transport: str
    kv_address: bytes
    num_layers: int
    num_kv_heads: int
    head_dim: int
    def __init__(self, machine_id: _Optional[str] = ..., role: _Optional[_Union[Role, str]] = ..., model: _Optional[str] = ..., dtype: _Optional[str] = ..., max_model_len: _Optional[int] = ..., vocab_size: _Optional[int] = ..., kv_block_size: _Optional[int] = ..., kv_num_blocks: _Optional[int] = ..., kv_transport: _Optional[str] = ..., kv_address: _Optional[bytes] = ..., num_layers: _Optional[int] = ..., num_kv_heads: _Optional[int] = ..., head_dim: _Optional[int] = ...) -> None: ...
