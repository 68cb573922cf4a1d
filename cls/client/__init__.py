"""The Python SDK of the cluster (grpc only, no torch): `from cls.client import ClsClient`.

- `sdk.py`: `ClsClient` (blocking) and `AsyncClsClient` (asyncio), their stream handles and
  `build_request`.
- `types.py`: the typed results (`Completion`, `Delta`, `MachineStatus`, ...) and errors (a
  `ClsError` subclass per gRPC status code).

Import from here; the module split is not part of the public surface.
"""

from cls.client.sdk import (
    DEFAULT_ADDRESS,
    DEFAULT_ADMIN_TIMEOUT_S,
    AsyncClsClient,
    AsyncGenerateStream,
    ClsClient,
    GenerateStream,
    build_request,
    default_address,
)
from cls.client.types import (
    ROLE_NAMES,
    AlreadyExists,
    Cancelled,
    ClsError,
    Completion,
    DeadlineExceeded,
    Delta,
    FailedPrecondition,
    Internal,
    InvalidArgument,
    MachineStatus,
    NotFound,
    PermissionDenied,
    PoolMove,
    Pools,
    PoolStatus,
    ResourceExhausted,
    Timing,
    Unauthenticated,
    Unavailable,
    error_for,
)

__all__ = [
    "DEFAULT_ADDRESS",
    "DEFAULT_ADMIN_TIMEOUT_S",
    "ROLE_NAMES",
    "AsyncClsClient",
    "AsyncGenerateStream",
    "Cancelled",
    "ClsClient",
    "ClsError",
    "Completion",
    "DeadlineExceeded",
    "Delta",
    "FailedPrecondition",
    "GenerateStream",
    "Internal",
    "InvalidArgument",
    "MachineStatus",
    "NotFound",
    "PermissionDenied",
    "PoolMove",
    "PoolStatus",
    "Pools",
    "AlreadyExists",
    "ResourceExhausted",
    "Timing",
    "Unauthenticated",
    "Unavailable",
    "build_request",
    "default_address",
    "error_for",
]
