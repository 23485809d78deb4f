"""Conversion at the edge: inference proto messages <-> engine types."""

from __future__ import annotations

from autoglm.inference.v1 import inference_service_pb2 as pb
from inference_svc.errors import InvalidMedia, InvalidRequest
from inference_svc.ids import check_session_id
from inference_svc.types import (
    AudioPart,
    ChatMessage,
    ChoiceEnd,
    Finished,
    FinishReason,
    GenerationRequest,
    ImagePart,
    ResponseFormat,
    SamplingParams,
    TextPart,
    TokenLogprob,
)

ROLE_NAMES = {pb.ROLE_SYSTEM: "system", pb.ROLE_USER: "user", pb.ROLE_ASSISTANT: "assistant"}
PCM_ENCODINGS = {pb.PCM_ENCODING_S16LE: "s16le", pb.PCM_ENCODING_F32LE: "f32le"}
FINISH_REASONS = {
    FinishReason.STOP: pb.FINISH_REASON_STOP,
    FinishReason.LENGTH: pb.FINISH_REASON_LENGTH,
    FinishReason.STOP_SEQUENCE: pb.FINISH_REASON_STOP_SEQUENCE,
    FinishReason.CANCELLED: pb.FINISH_REASON_CANCELLED,
}


def messages_from_pb(messages) -> list[ChatMessage]:
    out = []
    for i, message in enumerate(messages):
        field = f"messages[{i}]"
        if message.role not in ROLE_NAMES:
            raise InvalidRequest(f"{field}.role must be ROLE_SYSTEM, ROLE_USER or ROLE_ASSISTANT",
                                 field=f"{field}.role")
        parts = [_part_from_pb(part, f"{field}.parts[{j}]") for j, part in enumerate(message.parts)]
        out.append(ChatMessage(ROLE_NAMES[message.role], parts))
    return out


def _part_from_pb(part: pb.Part, field: str):
    kind = part.WhichOneof("content")
    if kind == "text":
        return TextPart(part.text)
    if kind == "image":
        return ImagePart(part.image.data, part.image.mime_type, f"{field}.image")
    if kind == "audio":
        audio = part.audio
        source = audio.WhichOneof("source")
        if source == "wav":
            return AudioPart(f"{field}.audio.wav", wav=audio.wav)
        if source == "pcm":
            pcm = audio.pcm
            if pcm.encoding not in PCM_ENCODINGS:
                raise InvalidRequest(f"{field}.audio.pcm.encoding must be S16LE or F32LE",
                                     field=f"{field}.audio.pcm.encoding")
            return AudioPart(f"{field}.audio.pcm", pcm=pcm.data, sample_rate=pcm.sample_rate_hz,
                             encoding=PCM_ENCODINGS[pcm.encoding], channels=pcm.channels or 1)
        raise InvalidRequest(f"{field}.audio has neither wav nor pcm", field=f"{field}.audio")
    raise InvalidRequest(f"{field} is empty: set text, image or audio", field=field)


def sampling_from_pb(params: pb.SamplingParams, defaults: SamplingParams) -> SamplingParams:
    def pick(name: str):
        return getattr(params, name) if params.HasField(name) else getattr(defaults, name)

    return SamplingParams(
        max_new_tokens=pick("max_new_tokens"),
        min_new_tokens=pick("min_new_tokens"),
        temperature=pick("temperature"),
        top_p=pick("top_p"),
        top_k=pick("top_k"),
        repetition_penalty=pick("repetition_penalty"),
        frequency_penalty=pick("frequency_penalty"),
        presence_penalty=pick("presence_penalty"),
        seed=params.seed if params.HasField("seed") else None,
        stop_sequences=tuple(params.stop_sequences),
        response_format=response_format_from_pb(params.response_format),
        logprobs=params.logprobs if params.HasField("logprobs") else None,
    )


def response_format_from_pb(fmt: pb.ResponseFormat) -> ResponseFormat | None:
    field = "sampling.response_format"
    kind = fmt.WhichOneof("format")
    if kind is None:
        return None
    if kind == "json_schema":
        schema = fmt.json_schema
        if not schema.schema:
            raise InvalidRequest(f"{field}.json_schema.schema must not be empty",
                                 field=f"{field}.json_schema.schema")
        return ResponseFormat("json_schema", schema=schema.schema, name=schema.name,
                              strict=schema.strict, field=field)
    if kind == "regex":
        return ResponseFormat("regex", pattern=fmt.regex, field=field)
    return ResponseFormat("json_object", field=field)


def logprobs_to_pb(entries: tuple[TokenLogprob, ...]) -> list[pb.TokenLogprob]:
    return [
        pb.TokenLogprob(
            token_id=e.token_id, token=e.token, token_bytes=e.token_bytes, logprob=e.logprob,
            top_logprobs=[pb.TopLogprob(token_id=a.token_id, token=a.token,
                                        token_bytes=a.token_bytes, logprob=a.logprob)
                          for a in e.top],
        )
        for e in entries
    ]


def sampling_to_pb(params: SamplingParams) -> pb.SamplingParams:
    return pb.SamplingParams(
        max_new_tokens=params.max_new_tokens, min_new_tokens=params.min_new_tokens,
        temperature=params.temperature, top_p=params.top_p, top_k=params.top_k,
        repetition_penalty=params.repetition_penalty,
        frequency_penalty=params.frequency_penalty, presence_penalty=params.presence_penalty,
    )


def request_from_pb(
    request: pb.GenerateRequest, *, request_id: str, defaults: SamplingParams,
    deadline: float | None,
) -> GenerationRequest:
    if request.session_id:
        check_session_id(request.session_id)
    return GenerationRequest(
        request_id=request_id,
        messages=messages_from_pb(request.messages),
        sampling=sampling_from_pb(request.sampling, defaults),
        session_id=request.session_id,
        enable_thinking=request.enable_thinking,
        return_reasoning=request.return_reasoning,
        priority=request.priority,
        deadline=deadline,
        n=request.n or 1,
    )


def live_start_from_pb(
    start: pb.GenerateLiveStart, *, sample_rate_hz: int, request_id: str,
    defaults: SamplingParams, deadline: float | None,
) -> tuple[GenerationRequest, str]:
    """GenerateLive's `start`: the request as Generate's (its errors name fields as
    Generate's do) and the audio's encoding, which must come at `sample_rate_hz`."""
    if not start.HasField("request"):
        raise InvalidRequest("start.request is required: the conversation to answer",
                             field="start.request")
    rate = start.format.sample_rate_hz
    if rate != sample_rate_hz:
        raise InvalidMedia(f"start.format.sample_rate_hz must be {sample_rate_hz}, not {rate}",
                           field="start.format.sample_rate_hz")
    if start.format.encoding not in PCM_ENCODINGS:
        raise InvalidMedia("start.format.encoding must be PCM_ENCODING_S16LE or "
                           "PCM_ENCODING_F32LE", field="start.format.encoding")
    request = request_from_pb(start.request, request_id=request_id, defaults=defaults,
                              deadline=deadline)
    return request, PCM_ENCODINGS[start.format.encoding]


def choice_end_to_pb(end: ChoiceEnd) -> pb.ChoiceEnd:
    return pb.ChoiceEnd(index=end.index, finish_reason=FINISH_REASONS[end.reason],
                        completion_tokens=end.completion_tokens,
                        reasoning_tokens=end.reasoning_tokens,
                        matched_stop_sequence=end.matched_stop_sequence)


def final_to_pb(finished: Finished, request_id: str) -> pb.GenerateResponse:
    usage = finished.usage
    return pb.GenerateResponse(
        request_id=request_id,
        final=pb.FinalMessage(
            finish_reason=FINISH_REASONS[finished.reason],
            usage=pb.Usage(
                prompt_tokens=usage.prompt_tokens, completion_tokens=usage.completion_tokens,
                cached_prompt_tokens=usage.cached_prompt_tokens,
                image_tokens=usage.image_tokens, audio_tokens=usage.audio_tokens,
                reasoning_tokens=usage.reasoning_tokens,
            ),
            matched_stop_sequence=finished.matched_stop_sequence,
            images=[
                pb.ImageInfo(width=i.width, height=i.height, original_width=i.original_width,
                             original_height=i.original_height,
                             reduced_under_pressure=i.reduced_under_pressure)
                for i in finished.images
            ],
            choices=[choice_end_to_pb(end) for end in finished.choices],
        ),
    )
