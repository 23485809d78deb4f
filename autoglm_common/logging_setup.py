"""structlog configuration: JSON lines in production, a console renderer on a terminal.

The inference service and the HTTP gateway log through it, so both write one format.

Exceptions are logged as type, message and frames (file, line, function) only: never
frame locals, which hold prompts, media bytes and tensors. Messages and every string
field are clipped, so one log line stays small whatever a request carried.
"""

from __future__ import annotations

import logging
import sys
from typing import Any

import structlog
from structlog.tracebacks import ExceptionDictTransformer
from structlog.typing import EventDict, ExcInfo, WrappedLogger

from autoglm_common.bounds import clip

EXCEPTION_MESSAGE_BYTES = 500
FIELD_BYTES = 2000
MAX_FRAMES = 30

_frames_only = ExceptionDictTransformer(show_locals=False, max_frames=MAX_FRAMES)


def exception_dicts(exc_info: ExcInfo) -> list[dict[str, Any]]:
    """The exception chain as dicts, without locals and with clipped messages."""
    stacks = _frames_only(exc_info)
    _clip_stacks(stacks)
    return stacks


def _clip_stacks(stacks: list[dict[str, Any]]) -> None:
    for stack in stacks:
        stack["exc_value"] = clip(stack.get("exc_value", ""), EXCEPTION_MESSAGE_BYTES)
        stack["exc_notes"] = [clip(n, EXCEPTION_MESSAGE_BYTES) for n in stack.get("exc_notes", ())]
        for group_member in stack.get("exceptions", ()):
            _clip_stacks(group_member)


def clip_fields(_: WrappedLogger, __: str, event_dict: EventDict) -> EventDict:
    """Clip every string field (an `error=repr(exc)` can quote a whole request)."""
    for key, value in event_dict.items():
        if isinstance(value, str):
            event_dict[key] = clip(value, FIELD_BYTES)
    return event_dict


def configure_logging(*, fmt: str = "auto", level: str = "info") -> None:
    use_console = fmt == "console" or (fmt == "auto" and sys.stderr.isatty())
    if use_console:
        tracebacks = (structlog.dev.RichTracebackFormatter(show_locals=False)
                      if structlog.dev.rich is not None else structlog.dev.plain_traceback)
        exceptions: Any = structlog.dev.set_exc_info
        renderer: Any = structlog.dev.ConsoleRenderer(exception_formatter=tracebacks)
    else:
        exceptions = structlog.processors.ExceptionRenderer(exception_dicts)
        renderer = structlog.processors.JSONRenderer()
    shared = [
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    processors = [
        structlog.contextvars.merge_contextvars,
        *shared,
        structlog.processors.StackInfoRenderer(),
        exceptions,
        clip_fields,
        renderer,
    ]
    structlog.configure(
        processors=processors,
        wrapper_class=structlog.make_filtering_bound_logger(logging.getLevelName(level.upper())),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=True,
    )
    # Libraries (uvicorn, grpc, transformers) log through stdlib logging: their records are
    # rendered by the same processors, so every line of the process is one format.
    formatter = structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=[structlog.contextvars.merge_contextvars,
                           structlog.stdlib.add_logger_name, *shared],
        processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta,
                    exceptions, clip_fields, renderer],
    )
    root = logging.getLogger()
    for handler in [h for h in root.handlers if isinstance(h, _StderrHandler)]:
        root.removeHandler(handler)
    handler = _StderrHandler()
    handler.setFormatter(formatter)
    root.addHandler(handler)
    root.setLevel(logging.WARNING)  # libraries' warnings; uvicorn sets its own loggers' level


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever sys.stderr is at the time (as structlog's logger does)."""

    def emit(self, record: logging.LogRecord) -> None:
        self.stream = sys.stderr
        super().emit(record)
