from proto import mlsd_pb2 as _mlsd_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class GenerateRequest(_message.Message):
    __slots__ = ("prompt", "prompt_token_ids", "apply_chat_template", "max_tokens", "temperature", "top_k", "top_p", "seed", "stop_token_ids", "ignore_eos", "request_id")
    PROMPT_FIELD_NUMBER: _ClassVar[int]
    PROMPT_TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    APPLY_CHAT_TEMPLATE_FIELD_NUMBER: _ClassVar[int]
    MAX_TOKENS_FIELD_NUMBER: _ClassVar[int]
    TEMPERATURE_FIELD_NUMBER: _ClassVar[int]
    TOP_K_FIELD_NUMBER: _ClassVar[int]
    TOP_P_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    STOP_TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    IGNORE_EOS_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    prompt: bytes
    prompt_token_ids: _containers.RepeatedScalarFieldContainer[int]
    apply_chat_template: bool
    max_tokens: int
    temperature: float
    top_k: int
    top_p: float
    seed: int
    stop_token_ids: _containers.RepeatedScalarFieldContainer[int]
    ignore_eos: bool
    request_id: str
    def __init__(self, prompt: _Optional[bytes] = ..., prompt_token_ids: _Optional[_Iterable[int]] = ..., apply_chat_template: _Optional[bool] = ..., max_tokens: _Optional[int] = ..., temperature: _Optional[float] = ..., top_k: _Optional[int] = ..., top_p: _Optional[float] = ..., seed: _Optional[int] = ..., stop_token_ids: _Optional[_Iterable[int]] = ..., ignore_eos: _Optional[bool] = ..., request_id: _Optional[str] = ...) -> None: ...

class Timing(_message.Message):
    __slots__ = ("ttft_s", "e2e_s", "tpot_s", "max_tbt_s", "queue_s")
    TTFT_S_FIELD_NUMBER: _ClassVar[int]
    E2E_S_FIELD_NUMBER: _ClassVar[int]
    TPOT_S_FIELD_NUMBER: _ClassVar[int]
    MAX_TBT_S_FIELD_NUMBER: _ClassVar[int]
    QUEUE_S_FIELD_NUMBER: _ClassVar[int]
    ttft_s: float
    e2e_s: float
    tpot_s: float
    max_tbt_s: float
    queue_s: float
    def __init__(self, ttft_s: _Optional[float] = ..., e2e_s: _Optional[float] = ..., tpot_s: _Optional[float] = ..., max_tbt_s: _Optional[float] = ..., queue_s: _Optional[float] = ...) -> None: ...

class GenerateResponse(_message.Message):
    __slots__ = ("request_id", "index", "token_ids", "text", "finish_reason", "num_prompt_tokens", "timing", "prompt_machine", "token_machine", "num_reroutes")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    INDEX_FIELD_NUMBER: _ClassVar[int]
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    FINISH_REASON_FIELD_NUMBER: _ClassVar[int]
    NUM_PROMPT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    TIMING_FIELD_NUMBER: _ClassVar[int]
    PROMPT_MACHINE_FIELD_NUMBER: _ClassVar[int]
    TOKEN_MACHINE_FIELD_NUMBER: _ClassVar[int]
    NUM_REROUTES_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    index: int
    token_ids: _containers.RepeatedScalarFieldContainer[int]
    text: str
    finish_reason: str
    num_prompt_tokens: int
    timing: Timing
    prompt_machine: str
    token_machine: str
    num_reroutes: int
    def __init__(self, request_id: _Optional[str] = ..., index: _Optional[int] = ..., token_ids: _Optional[_Iterable[int]] = ..., text: _Optional[str] = ..., finish_reason: _Optional[str] = ..., num_prompt_tokens: _Optional[int] = ..., timing: _Optional[_Union[Timing, _Mapping]] = ..., prompt_machine: _Optional[str] = ..., token_machine: _Optional[str] = ..., num_reroutes: _Optional[int] = ...) -> None: ...

class MachineStatus(_message.Message):
    __slots__ = ("machine_id", "address", "home", "role", "draining", "pending_prompt_tokens", "pending_decode_tokens", "kv_blocks_free", "kv_blocks_total", "num_requests", "lease_expires_in_s")
    MACHINE_ID_FIELD_NUMBER: _ClassVar[int]
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    HOME_FIELD_NUMBER: _ClassVar[int]
    ROLE_FIELD_NUMBER: _ClassVar[int]
    DRAINING_FIELD_NUMBER: _ClassVar[int]
    PENDING_PROMPT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    PENDING_DECODE_TOKENS_FIELD_NUMBER: _ClassVar[int]
    KV_BLOCKS_FREE_FIELD_NUMBER: _ClassVar[int]
    KV_BLOCKS_TOTAL_FIELD_NUMBER: _ClassVar[int]
    NUM_REQUESTS_FIELD_NUMBER: _ClassVar[int]
    LEASE_EXPIRES_IN_S_FIELD_NUMBER: _ClassVar[int]
    machine_id: str
    address: str
    home: _mlsd_pb2.Role
    role: _mlsd_pb2.Role
    draining: bool
    pending_prompt_tokens: int
    pending_decode_tokens: int
    kv_blocks_free: int
    kv_blocks_total: int
    num_requests: int
    lease_expires_in_s: float
    def __init__(self, machine_id: _Optional[str] = ..., address: _Optional[str] = ..., home: _Optional[_Union[_mlsd_pb2.Role, str]] = ..., role: _Optional[_Union[_mlsd_pb2.Role, str]] = ..., draining: _Optional[bool] = ..., pending_prompt_tokens: _Optional[int] = ..., pending_decode_tokens: _Optional[int] = ..., kv_blocks_free: _Optional[int] = ..., kv_blocks_total: _Optional[int] = ..., num_requests: _Optional[int] = ..., lease_expires_in_s: _Optional[float] = ...) -> None: ...

class PoolStatus(_message.Message):
    __slots__ = ("role", "machine_ids", "pending_tokens")
    ROLE_FIELD_NUMBER: _ClassVar[int]
    MACHINE_IDS_FIELD_NUMBER: _ClassVar[int]
    PENDING_TOKENS_FIELD_NUMBER: _ClassVar[int]
    role: _mlsd_pb2.Role
    machine_ids: _containers.RepeatedScalarFieldContainer[str]
    pending_tokens: int
    def __init__(self, role: _Optional[_Union[_mlsd_pb2.Role, str]] = ..., machine_ids: _Optional[_Iterable[str]] = ..., pending_tokens: _Optional[int] = ...) -> None: ...

class ListMachinesRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListMachinesReply(_message.Message):
    __slots__ = ("machines",)
    MACHINES_FIELD_NUMBER: _ClassVar[int]
    machines: _containers.RepeatedCompositeFieldContainer[MachineStatus]
    def __init__(self, machines: _Optional[_Iterable[_Union[MachineStatus, _Mapping]]] = ...) -> None: ...

class ListPoolsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListPoolsReply(_message.Message):
    __slots__ = ("pools", "num_borrowed", "num_returned")
    POOLS_FIELD_NUMBER: _ClassVar[int]
    NUM_BORROWED_FIELD_NUMBER: _ClassVar[int]
    NUM_RETURNED_FIELD_NUMBER: _ClassVar[int]
    pools: _containers.RepeatedCompositeFieldContainer[PoolStatus]
    num_borrowed: int
    num_returned: int
    def __init__(self, pools: _Optional[_Iterable[_Union[PoolStatus, _Mapping]]] = ..., num_borrowed: _Optional[int] = ..., num_returned: _Optional[int] = ...) -> None: ...

class ResizePoolsRequest(_message.Message):
    __slots__ = ("num_prompt", "num_token")
    NUM_PROMPT_FIELD_NUMBER: _ClassVar[int]
    NUM_TOKEN_FIELD_NUMBER: _ClassVar[int]
    num_prompt: int
    num_token: int
    def __init__(self, num_prompt: _Optional[int] = ..., num_token: _Optional[int] = ...) -> None: ...

class PoolMove(_message.Message):
    __slots__ = ("machine_id", "from_pool", "to_pool")
    MACHINE_ID_FIELD_NUMBER: _ClassVar[int]
    FROM_POOL_FIELD_NUMBER: _ClassVar[int]
    TO_POOL_FIELD_NUMBER: _ClassVar[int]
    machine_id: str
    from_pool: _mlsd_pb2.Role
    to_pool: _mlsd_pb2.Role
    def __init__(self, machine_id: _Optional[str] = ..., from_pool: _Optional[_Union[_mlsd_pb2.Role, str]] = ..., to_pool: _Optional[_Union[_mlsd_pb2.Role, str]] = ...) -> None: ...

class ResizePoolsReply(_message.Message):
    __slots__ = ("moves",)
    MOVES_FIELD_NUMBER: _ClassVar[int]
    moves: _containers.RepeatedCompositeFieldContainer[PoolMove]
    def __init__(self, moves: _Optional[_Iterable[_Union[PoolMove, _Mapping]]] = ...) -> None: ...

class DrainRequest(_message.Message):
    __slots__ = ("machine_id",)
    MACHINE_ID_FIELD_NUMBER: _ClassVar[int]
    machine_id: str
    def __init__(self, machine_id: _Optional[str] = ...) -> None: ...

class DrainReply(_message.Message):
    __slots__ = ("machine",)
    MACHINE_FIELD_NUMBER: _ClassVar[int]
    machine: MachineStatus
    def __init__(self, machine: _Optional[_Union[MachineStatus, _Mapping]] = ...) -> None: ...

class RegisterRequest(_message.Message):
    __slots__ = ("info", "address")
    INFO_FIELD_NUMBER: _ClassVar[int]
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    info: _mlsd_pb2.MachineInfo
    address: str
    def __init__(self, info: _Optional[_Union[_mlsd_pb2.MachineInfo, _Mapping]] = ..., address: _Optional[str] = ...) -> None: ...

class RegisterReply(_message.Message):
    __slots__ = ("lease_id", "lease_ttl_s", "heartbeat_interval_s")
    LEASE_ID_FIELD_NUMBER: _ClassVar[int]
    LEASE_TTL_S_FIELD_NUMBER: _ClassVar[int]
    HEARTBEAT_INTERVAL_S_FIELD_NUMBER: _ClassVar[int]
    lease_id: str
    lease_ttl_s: float
    heartbeat_interval_s: float
    def __init__(self, lease_id: _Optional[str] = ..., lease_ttl_s: _Optional[float] = ..., heartbeat_interval_s: _Optional[float] = ...) -> None: ...

class HeartbeatRequest(_message.Message):
    __slots__ = ("lease_id", "load")
    LEASE_ID_FIELD_NUMBER: _ClassVar[int]
    LOAD_FIELD_NUMBER: _ClassVar[int]
    lease_id: str
    load: _mlsd_pb2.LoadReport
    def __init__(self, lease_id: _Optional[str] = ..., load: _Optional[_Union[_mlsd_pb2.LoadReport, _Mapping]] = ...) -> None: ...

class HeartbeatReply(_message.Message):
    __slots__ = ("known",)
    KNOWN_FIELD_NUMBER: _ClassVar[int]
    known: bool
    def __init__(self, known: _Optional[bool] = ...) -> None: ...
