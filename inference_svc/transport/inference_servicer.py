"""InferenceService: thin edge between the public proto API and the engine."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Callable

import grpc
import structlog
from google.protobuf import struct_pb2

from autoglm.inference.v1 import inference_service_pb2 as pb
from autoglm.inference.v1 import inference_service_pb2_grpc as pb_grpc
from autoglm_common.bounds import quote
from inference_svc.engine.jobs import RequestHandle
from inference_svc.errors import DeadlineExceeded, NotReady, UnknownSession
from inference_svc.ids import check_session_id
from inference_svc.service_state import ServiceState
from inference_svc.transport.convert import (
    choice_end_to_pb,
    final_to_pb,
    logprobs_to_pb,
    messages_from_pb,
    request_from_pb,
    sampling_to_pb,
)
from inference_svc.transport.live_audio import LiveInput, LiveLimits
from inference_svc.transport.tiers import tier_to_pb
from inference_svc.types import ChoiceEnd, Delta, Finished, FinishReason


def _ignore(*args: object) -> None:
    pass


def _request_id() -> str:
    return structlog.contextvars.get_contextvars()["request_id"]


def _deadline(context: grpc.aio.ServicerContext) -> float | None:
    remaining = context.time_remaining()
    return time.monotonic() + remaining if remaining is not None else None


class InferenceServicer(pb_grpc.InferenceServiceServicer):
    def __init__(self, state: ServiceState) -> None:
        self.state = state

    def _engine(self):
        if self.state.engine is None:
            raise NotReady("the model is still loading; retry when health is SERVING")
        return self.state.engine

    async def Generate(self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext):
        engine = self._engine()
        request_id = _request_id()
        generation = request_from_pb(request, request_id=request_id,
                                     defaults=self.state.config.defaults,
                                     deadline=_deadline(context))
        await context.send_initial_metadata((("x-request-id", request_id),))
        timer = self.state.metrics.timer() if self.state.metrics is not None else None
        handle = await engine.submit(generation)
        async for response in self._reply(handle, timer):
            yield response

    async def GenerateLive(self, requests: AsyncIterator[pb.GenerateLiveRequest],
                           context: grpc.aio.ServicerContext):
        """Submit at `start`; the audio streams in beside the reply (live_audio.py), which
        streams exactly as Generate's does."""
        engine = self._engine()
        metrics = self.state.metrics
        live = LiveInput(requests, LiveLimits.of(self.state.config),
                         on_audio=metrics.live_audio_seconds.inc if metrics else _ignore)
        if metrics is not None:
            metrics.live_audio_streams.inc()
        try:
            with engine.live_audio():  # its encoder stays loaded while the stream is open
                generation = await live.start(request_id=_request_id(),
                                              defaults=self.state.config.defaults,
                                              deadline=_deadline(context))
                await context.send_initial_metadata((("x-request-id", generation.request_id),))
                handle, audio = await engine.submit_live(generation)
                if metrics is not None:
                    audio.on_encoded = metrics.live_audio_chunk_encode.observe
                live.feed(audio, handle.cancel)
                timer = metrics.timer() if metrics is not None else None

                def before_event() -> None:
                    live.check()  # the input failed: so does the call (its request stopped)
                    if timer is not None and live.ended_at is not None:
                        timer.started = max(timer.started, live.ended_at)  # timed from `end`

                first = True
                try:
                    async for response in self._reply(handle, timer, before_event):
                        if response.HasField("final"):
                            response.final.usage.audio_seconds = live.seconds
                        elif first and metrics is not None and live.ended_at is not None:
                            metrics.live_audio_first_token.observe(
                                time.monotonic() - live.ended_at)
                        first = False
                        yield response
                except Exception:
                    live.check()  # a failed input is why the reply failed
                    raise
                live.check()
        finally:  # ended, failed, or the client went away mid-utterance: drop the audio now
            live.close()
            if metrics is not None:
                metrics.live_audio_streams.dec()

    async def _reply(self, handle: RequestHandle, timer, check: Callable[[], None] = _ignore,
                     ) -> AsyncIterator[pb.GenerateResponse]:
        """Stream a submitted request's events as GenerateResponse messages; `check`
        runs before each (it raises when the call has failed elsewhere)."""
        request_id = handle.request.request_id
        ended = False
        try:
            async for event in handle.events():
                check()
                if isinstance(event, Delta):
                    if timer is not None:
                        timer.delta()
                    yield pb.GenerateResponse(request_id=request_id, text_delta=event.text,
                                              reasoning_delta=event.reasoning,
                                              logprobs=logprobs_to_pb(event.logprobs),
                                              index=event.index)
                elif isinstance(event, ChoiceEnd):
                    yield pb.GenerateResponse(request_id=request_id, index=event.index,
                                              choice_end=choice_end_to_pb(event))
                elif isinstance(event, Finished):
                    if event.reason is FinishReason.CANCELLED and handle.cancellation.expired:
                        ended = True
                        if timer is not None:
                            timer.failed("deadline")
                        raise DeadlineExceeded("deadline exceeded while generating")
                    ended = True
                    if timer is not None:
                        timer.finished(event)
                    yield final_to_pb(event, request_id)
        except Exception:
            if timer is not None and not ended:
                timer.failed("error")
            ended = True
            raise
        finally:
            handle.cancel()  # client gone, deadline, or shutdown: stop generating at once
            if timer is not None and not ended:  # the client cancelled or went away
                timer.failed(FinishReason.CANCELLED.value)

    async def GetModelInfo(self, request, context) -> pb.GetModelInfoResponse:
        engine = self._engine()
        model = engine.model
        modules = []
        for unit in model.units:
            state = unit.state()
            entry = model.manifest.modules[unit.name]
            modules.append(pb.ModuleInfo(
                name=unit.name, architecture=unit.architecture, parameters=state.parameters,
                trained=entry.trained, tier=tier_to_pb(state.tier),
                device="" if state.tier == "disk" else state.tier,
                weight_bytes=state.weight_bytes, note=entry.note,
                weight_precision=state.precision,
            ))
        details = struct_pb2.Struct()
        details.update({"model": model.name, "bundle": str(model.bundle),
                        "dtype": str(model.dtype).removeprefix("torch."), **model.manifest.details})
        return pb.GetModelInfoResponse(
            name=self.state.config.served_model_name, modules=modules,
            context_length=model.context_length, modalities=model.modalities,
            default_sampling=sampling_to_pb(self.state.config.defaults), details=details,
        )

    async def CountTokens(self, request: pb.CountTokensRequest, context) -> pb.CountTokensResponse:
        plan = await self._engine().count_tokens(
            messages_from_pb(request.messages), enable_thinking=request.enable_thinking
        )
        return pb.CountTokensResponse(prompt_tokens=len(plan.input_ids),
                                      image_tokens=plan.image_tokens,
                                      audio_tokens=plan.audio_tokens)

    async def EndSession(self, request: pb.EndSessionRequest, context) -> pb.EndSessionResponse:
        session_id = check_session_id(request.session_id)
        freed = self._engine().end_session(session_id)
        if freed is None:
            raise UnknownSession(f"no session {quote(session_id)}", field="session_id")
        return pb.EndSessionResponse(freed_bytes=freed)
