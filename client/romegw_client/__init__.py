"""romegw_client: the Python SDK of rome-gateway (grpcio + protobuf, no torch).

Public names: Client, AsyncClient, channel_credentials, tls_credentials, the reply types
(GenerateChunk, Completion, ScoreResult, ContinuationScore, ModelInfo) and the
typed errors (GatewayError and one subclass per status code).
"""

from .client import SERVICE_NAME, AsyncClient, Client, channel_credentials, generate_request, tls_credentials
from .errors import (
    Cancelled,
    DeadlineExceeded,
    FailedPrecondition,
    GatewayError,
    Internal,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    ResourceExhausted,
    Unauthenticated,
    Unavailable,
    Unimplemented,
    from_rpc_error,
)
from .types import (
    TRACE_KINDS,
    ApplyResult,
    Completion,
    ContinuationScore,
    EditInfo,
    EditPage,
    FactInfo,
    GenerateChunk,
    GeneratedToken,
    LayerFile,
    ModelInfo,
    RevertResult,
    ScoreResult,
    TokenLogprob,
    TraceProgress,
    TraceResult,
)

__version__ = "0.1.0"

__all__ = [
    "ApplyResult",
    "EditInfo",
    "FactInfo",
    "EditPage",
    "LayerFile",
    "RevertResult",
    "TraceProgress",
    "TraceResult",
    "TRACE_KINDS",
    "SERVICE_NAME",
    "AsyncClient",
    "Cancelled",
    "Client",
    "Completion",
    "ContinuationScore",
    "DeadlineExceeded",
    "FailedPrecondition",
    "GatewayError",
    "GenerateChunk",
    "GeneratedToken",
    "Internal",
    "InvalidArgument",
    "ModelInfo",
    "NotFound",
    "PermissionDenied",
    "ResourceExhausted",
    "ScoreResult",
    "TokenLogprob",
    "Unauthenticated",
    "Unavailable",
    "Unimplemented",
    "channel_credentials",
    "tls_credentials",
    "from_rpc_error",
    "generate_request",
]
