"""Plain-text rendering of model info, memory status and usage for the terminal."""

from __future__ import annotations

import unicodedata
from collections.abc import Sequence

from google.protobuf.json_format import MessageToDict

from autoglm.common.v1 import tier_pb2
from autoglm.control.v1 import control_service_pb2 as cpb
from autoglm.inference.v1 import inference_service_pb2 as pb
from autoglm_client.results import Final

_BYTE_UNITS = ("B", "KiB", "MiB", "GiB", "TiB")


def format_bytes(count: int) -> str:
    """Bytes in binary units: 0 B, 512 B, 1.5 KiB, 10.6 GiB."""
    value = float(count)
    unit_index = 0
    while value >= 1024 and unit_index < len(_BYTE_UNITS) - 1:
        value /= 1024
        unit_index += 1
    return f"{count} B" if unit_index == 0 else f"{value:.1f} {_BYTE_UNITS[unit_index]}"


def format_count(count: int) -> str:
    """A parameter count: 950, 5.7M, 9.4B."""
    for threshold, suffix in ((1e9, "B"), (1e6, "M"), (1e3, "K")):
        if count >= threshold:
            return f"{count / threshold:.1f}{suffix}"
    return str(count)


def display_width(value: str) -> int:
    """Terminal columns `value` takes (wide CJK characters take two)."""
    return sum(2 if unicodedata.east_asian_width(char) in "WF" else 1 for char in value)


def table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A left-aligned text table with a header row; '(none)' when there are no rows."""
    cells = [[str(cell) for cell in row] for row in rows]
    widths = [
        max(display_width(line[column]) for line in [list(headers), *cells])
        for column in range(len(headers))
    ]

    def line(values: Sequence[str]) -> str:
        padded = [v + " " * (w - display_width(v)) for v, w in zip(values, widths, strict=True)]
        return "  ".join(padded).rstrip()

    body = [line(row) for row in cells] or ["(none)"]
    return "\n".join([line(headers), *body])


def _tier_name(tier: int) -> str:
    return tier_pb2.Tier.Name(tier).removeprefix("TIER_").lower()


def _sampling_summary(sampling: pb.SamplingParams) -> str:
    values = MessageToDict(sampling, preserving_proto_field_name=True)
    return " ".join(f"{key}={value}" for key, value in values.items()) or "(server has none)"


def model_info_text(info: pb.GetModelInfoResponse) -> str:
    """The model info as a header block, a module table and a plain word on training."""
    header = [
        f"Model:       {info.name}",
        f"Context:     {info.context_length} tokens",
        f"Modalities:  {', '.join(info.modalities)}",
        f"Defaults:    {_sampling_summary(info.default_sampling)}",
    ]
    header += [f"{key + ':':<12} {value}" for key, value in MessageToDict(info.details).items()]
    modules = table(
        ["MODULE", "ARCHITECTURE", "PARAMS", "TRAINED", "TIER", "DEVICE", "WEIGHTS", "PRECISION",
         "NOTE"],
        [
            [
                m.name,
                m.architecture,
                format_count(m.parameters),
                "yes" if m.trained else "NO",
                _tier_name(m.tier),
                m.device or "-",
                format_bytes(m.weight_bytes),
                m.weight_precision or "-",
                m.note,
            ]
            for m in info.modules
        ],
    )
    untrained = [m.name for m in info.modules if not m.trained]
    if untrained:
        verdict = (
            f"Untrained modules: {', '.join(untrained)}. Their weights are random (seeded):"
            " inputs for them are accepted and encoded, but the model does not understand"
            " them."
        )
    else:
        verdict = "All modules are trained."
    return "\n".join([*header, "", modules, "", verdict])


def memory_status_text(status: cpb.MemoryStatus) -> str:
    """The memory account as a summary block and tables of devices, modules and KV."""
    admission = cpb.AdmissionMode.Name(status.admission_mode).removeprefix("ADMISSION_MODE_")
    if status.admission_mode == cpb.ADMISSION_MODE_LIMITED:
        admission += f" (max {status.admission_limit} running)"
    summary = [
        f"Taken at:    {status.taken_at.ToDatetime().isoformat()}Z   pid {status.pid}",
        f"Process RSS: {format_bytes(status.process_rss_bytes)}",
        f"KV cache:    {format_bytes(status.kv_bytes)} of "
        f"{format_bytes(status.kv_budget_bytes)} budget",
        f"Requests:    {status.running_requests} running, {status.queued_requests} queued,"
        f" {status.completed_requests} completed",
        f"Admission:   {admission.lower()}",
        f"In use:      {', '.join(status.modalities_in_use) or '-'}",
    ]
    devices = table(
        ["DEVICE", "UUID", "WEIGHTS", "KV", "ALLOCATED", "RESERVED", "TOTAL"],
        [
            [
                d.device,
                d.uuid or "-",
                format_bytes(d.weight_bytes),
                format_bytes(d.kv_bytes),
                format_bytes(d.allocated_bytes),
                format_bytes(d.reserved_bytes),
                format_bytes(d.total_bytes),
            ]
            for d in status.devices
        ],
    )
    modules = table(
        ["MODULE", "MODALITY", "TIER", "DEVICE", "WEIGHTS", "PRECISION", "ACTIVE", "IDLE"],
        [
            [
                m.name,
                m.modality,
                _tier_name(m.tier),
                m.device or "-",
                format_bytes(m.weight_bytes),
                m.weight_precision or "-",
                m.active_requests,
                f"{m.idle_seconds:.1f}s",
            ]
            for m in status.modules
        ],
    )
    requests = table(
        ["REQUEST", "SESSION", "TOKENS", "KV"],
        [
            [r.request_id, r.session_id or "-", r.tokens, format_bytes(r.bytes)]
            for r in status.requests
        ],
    )
    sessions = table(
        ["SESSION", "TOKENS", "KV", "IDLE", "DEVICE"],
        [
            [s.session_id, s.tokens, format_bytes(s.bytes), f"{s.idle_seconds:.1f}s", s.device]
            for s in status.sessions
        ],
    )
    actions = table(
        ["AT", "ACTION", "FREED", "SECONDS", "DETAIL"],
        [
            [
                a.at.ToDatetime().strftime("%H:%M:%S"),
                a.action,
                format_bytes(a.result.freed_bytes),
                f"{a.result.duration_seconds:.3f}",
                a.result.detail,
            ]
            for a in status.recent_actions
        ],
    )
    return "\n".join(
        [
            *summary,
            "",
            "Devices",
            devices,
            "",
            "Modules",
            modules,
            "",
            "KV of running requests",
            requests,
            "",
            "KV of idle sessions",
            sessions,
            "",
            "Last control actions (memory daemon or operator)",
            actions,
        ]
    )


def usage_text(final: Final) -> str:
    """One line of token accounting for stderr, plus one line per encoded image."""
    usage = final.usage
    lines = [
        f"usage: {usage.prompt_tokens} prompt tokens ({usage.cached_prompt_tokens} cached,"
        f" {usage.image_tokens} image, {usage.audio_tokens} audio),"
        f" {usage.completion_tokens} completion tokens ({usage.reasoning_tokens} reasoning);"
        f" finish: {final.finish_reason}"
        + (f" {final.matched_stop_sequence!r}" if final.matched_stop_sequence else "")
        + (f"; request {final.request_id}" if final.request_id else "")
    ]
    lines += [
        f"image {index}: {i.original_width}x{i.original_height} encoded as {i.width}x{i.height}"
        for index, i in enumerate(final.images, start=1)
    ]
    return "\n".join(lines)


def live_text(audio_seconds: float, first_token_after_s: float | None) -> str:
    """One line on a GenerateLive call: the audio sent and how soon the reply began."""
    reply = (
        "no text streamed" if first_token_after_s is None
        else f"first token {first_token_after_s:.3f} s after its end"
    )
    return f"live: {audio_seconds:.2f} s of audio; {reply}"
