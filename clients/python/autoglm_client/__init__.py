"""Python client of autoglm-serve: inference (sync and asyncio), control, and the CLI."""

from autoglm_client.aio import AsyncInferenceClient
from autoglm_client.channel import tls_credentials
from autoglm_client.content import (
    assistant,
    audio,
    image,
    part,
    pcm_audio,
    prompt_conversation,
    sniff_image_mime,
    system,
    text,
    to_messages,
    user,
)
from autoglm_client.control import ControlClient
from autoglm_client.errors import (
    AuthError,
    AutoglmError,
    CancelledError,
    DeadlineExceededError,
    FailedPreconditionError,
    InputError,
    InvalidArgumentError,
    NotFoundError,
    ResourceExhaustedError,
    RpcError,
    UnavailableError,
)
from autoglm_client.inference import InferenceClient
from autoglm_client.request_builders import Sampling
from autoglm_client.results import (
    Completion,
    Final,
    FinishReason,
    ImageSize,
    ProtocolError,
    ReasoningDelta,
    StreamEvent,
    TextDelta,
    Usage,
)

__all__ = [
    "AsyncInferenceClient",
    "AuthError",
    "AutoglmError",
    "CancelledError",
    "Completion",
    "ControlClient",
    "DeadlineExceededError",
    "FailedPreconditionError",
    "Final",
    "FinishReason",
    "ImageSize",
    "InferenceClient",
    "InputError",
    "InvalidArgumentError",
    "NotFoundError",
    "ProtocolError",
    "ReasoningDelta",
    "ResourceExhaustedError",
    "RpcError",
    "Sampling",
    "StreamEvent",
    "TextDelta",
    "UnavailableError",
    "Usage",
    "assistant",
    "audio",
    "image",
    "part",
    "pcm_audio",
    "prompt_conversation",
    "sniff_image_mime",
    "system",
    "text",
    "tls_credentials",
    "to_messages",
    "user",
]
