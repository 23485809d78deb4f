"""OpenAI's Realtime API over a WebSocket at /v1/realtime: speech in, text out.

The client appends pcm16 audio (24 kHz, resampled here to the service's 16 kHz), commits
it as a user item and asks for a response; the reply streams back as text deltas. While
the user speaks, the speech already flows to the service over a GenerateLive call opened
at the first append with the request a response would make; response.create sends its
`end`, so only the reply is left to wait for. Whenever that call cannot serve the response
as it is asked (the conversation or settings changed since it opened, the response brings
its own input or overrides, the service dropped the call), the response is a Generate
call with the whole conversation instead: slower, same answer.

With `server_vad` turn detection the gateway commits and asks for the response itself:
its detector (realtime_vad) watches the appended audio; silence before speech is kept only
as far as `prefix_padding_ms` reaches back and never reaches the service; at speech start
the GenerateLive call opens with that padding, and when the speech stops the buffer up to
the end of the silence becomes the item and the response sends `end`. Speech starting
while a response streams cancels it (`interrupt_response`).

Errors are `error` events and the connection stays open; closing the socket cancels the
upstream calls and ends the service-side session. Without turn detection (OpenAI's
`turn_detection: null`, this gateway's default) the client commits.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import uuid

import grpc
import structlog
from fastapi import WebSocket
from fastapi.responses import JSONResponse
from starlette.websockets import WebSocketDisconnect

from autoglm_common.ids import is_request_id

from .checks import check_api_key, check_model
from .config import GatewayConfig
from .errors import BadRequest, GatewayError
from .observability import GatewayMetrics
from .realtime_conversation import (
    SERVICE_RATE_HZ,
    Audio,
    Conversation,
    Item,
    Settings,
    generate_request,
)
from .realtime_events import Event, RealtimeEvents, ResponseState, new_id
from .realtime_response import ResponseRun
from .realtime_schema import (
    BufferAppend,
    BufferClear,
    BufferCommit,
    ClientEvent,
    ItemCreate,
    ItemDelete,
    ResponseCancel,
    ResponseCreate,
    SessionUpdate,
    client_event_id,
    decode_audio,
    decode_event,
    response_settings,
    to_item,
    updated_session,
    validate_event,
)
from .realtime_upload import LiveUpload
from .realtime_vad import FRAME_SAMPLES, Boundary, SpeechDetector
from .resample import Resampler
from .upstream import InferenceUpstream

log = structlog.get_logger(__name__)

MAX_BUFFER_S = 120.0  # the service's audio decoder refuses longer clips in any case
# what browsers offer, since they cannot set headers: the protocol, the key, the dialect
_PROTOCOL = "realtime"
_KEY_PROTOCOL = "openai-insecure-api-key."
_BETA_PROTOCOL = "openai-beta.realtime-v1"


async def serve(websocket: WebSocket, *, config: GatewayConfig, upstream: InferenceUpstream,
                metrics: GatewayMetrics) -> None:
    """One connection: checked like the HTTP routes before the upgrade, then a session."""
    offered: list[str] = websocket.scope.get("subprotocols", [])
    key = next((p.removeprefix(_KEY_PROTOCOL) for p in offered if p.startswith(_KEY_PROTOCOL)),
               None)
    authorization = websocket.headers.get("authorization") or (key and f"Bearer {key}")
    beta = ("realtime=v1" in websocket.headers.get("openai-beta", "").replace(" ", "")
            or _BETA_PROTOCOL in offered)
    incoming_id = websocket.headers.get("x-request-id")
    request_id = incoming_id if is_request_id(incoming_id) else uuid.uuid4().hex
    structlog.contextvars.clear_contextvars()
    structlog.contextvars.bind_contextvars(request_id=request_id, route="realtime")
    try:
        check_api_key(config, authorization)
        model = websocket.query_params.get("model")
        if model is None:
            raise BadRequest("the query parameter 'model' is required: /v1/realtime?model=...",
                             param="model", code="missing_required_parameter")
        check_model(model, config, param="model")
    except GatewayError as error:
        log.info("realtime_refused", status=error.status_code, code=error.code)
        await _refuse(websocket, error)
        return
    await websocket.accept(subprotocol=_PROTOCOL if _PROTOCOL in offered else None)
    session_hex = uuid.uuid4().hex[:24]
    events = RealtimeEvents(beta=beta, model=config.served_model_name,
                            session_id=f"sess_{session_hex}")
    metrics.realtime_sessions.inc()
    try:
        await RealtimeSession(websocket, config=config, upstream=upstream, events=events,
                              metrics=metrics, session_id=f"realtime-{session_hex}").serve()
    finally:
        metrics.realtime_sessions.dec()


def _samples(ms: float) -> int:
    """At the service's rate."""
    return int(ms * SERVICE_RATE_HZ // 1000)


async def _refuse(websocket: WebSocket, error: GatewayError) -> None:
    """Answer the upgrade with the HTTP error the other routes give; a server without the
    denial-response extension closes with 1008 (policy violation) instead."""
    try:
        await websocket.send_denial_response(JSONResponse(
            error.to_body(), status_code=error.status_code, headers=error.headers()))
    except RuntimeError:
        await websocket.close(code=1008, reason=error.message[:120])


class RealtimeSession:
    def __init__(self, websocket: WebSocket, *, config: GatewayConfig,
                 upstream: InferenceUpstream, events: RealtimeEvents, metrics: GatewayMetrics,
                 session_id: str) -> None:
        self._websocket = websocket
        self._config = config
        self._upstream = upstream
        self._events = events
        self._metrics = metrics
        self._session_id = session_id  # the service's, for its cached state across turns
        self._conversation_id = new_id("conv")
        self.settings = Settings()
        self.conversation = Conversation()
        # the uncommitted speech, at the service's rate, and what converts appended audio
        self._buffer = bytearray()
        self._resampler: Resampler | None = None
        self._received_samples = 0  # appended since the last commit, at the input rate
        self._buffer_start = 0  # where the buffer begins in the session's 16 kHz audio
        # under turn detection: the detector, whether the buffer holds speech, its item's id
        self._detector: SpeechDetector | None = None
        self._speaking = False
        self._turn_item_id: str | None = None
        self._live: LiveUpload | None = None
        self._run: ResponseRun | None = None
        self._task: asyncio.Task[None] | None = None
        self._send_lock = asyncio.Lock()
        self._session_used = False  # a response ran with the service-side session
        self._num_responses = 0

    async def serve(self) -> None:
        try:
            await self._send(self._events.session_created(self.settings))
            while True:
                message = await self._websocket.receive()
                if message["type"] == "websocket.disconnect":
                    return
                raw = message.get("text")
                await self._handle(raw if raw is not None else message.get("bytes", b""))
        except WebSocketDisconnect:
            return
        finally:
            await self._close()

    async def _handle(self, raw: str | bytes) -> None:
        event_id: str | None = None
        try:
            event = decode_event(raw)
            event_id = client_event_id(event)
            await self._dispatch(validate_event(event))
        except GatewayError as error:
            await self._send(self._events.error(error, event_id))

    async def _dispatch(self, event: ClientEvent) -> None:
        match event:
            case SessionUpdate():
                await self._update_session(event)
            case BufferAppend():
                await self._append(event)
            case BufferCommit():
                await self._commit()
            case BufferClear():
                await self._clear()
            case ItemCreate():
                await self._create_item(event)
            case ItemDelete():
                await self._delete_item(event)
            case ResponseCreate():
                await self._create_response(event)
            case ResponseCancel():
                self._cancel_response(event)

    async def _update_session(self, event: SessionUpdate) -> None:
        settings = updated_session(self.settings, event.session)
        new_rate = settings.input_rate_hz != self.settings.input_rate_hz
        new_turns = settings.turn_detection != self.settings.turn_detection
        if (new_rate or new_turns) and self._turn_open():
            param = ("session.audio.input.format" if new_rate
                     else "session.turn_detection"
                     if "turn_detection" in event.session.model_fields_set
                     else "session.audio.input.turn_detection")
            raise BadRequest(f"{param}: the input audio buffer holds "
                             f"{'speech' if self._detector else 'audio'} taken under the "
                             "current settings; commit or clear it first", param=param,
                             code="invalid_value")
        self.settings = settings
        if new_rate or new_turns:
            self._restart_input()
        await self._send(self._events.session_updated(settings))
        await self._sync_live()

    async def _append(self, event: BufferAppend) -> None:
        pcm = decode_audio(event.audio, "audio")
        rate = self.settings.input_rate_hz
        if self._detector is None:  # a detected turn ends by itself at this length
            samples = self._received_samples + len(pcm) // 2
            if samples > MAX_BUFFER_S * rate:
                raise BadRequest(f"audio: the input audio buffer would pass {MAX_BUFFER_S:g} "
                                 "s; commit it (or clear it) first", param="audio",
                                 code="input_audio_buffer_too_large")
            self._received_samples = samples
        if self._resampler is None:
            self._resampler = Resampler(rate, SERVICE_RATE_HZ)
        fresh = self._resampler.feed(pcm)
        if self._detector is not None:
            await self._detect_turns(self._detector, fresh)
            return
        self._buffer += fresh
        await self._sync_live(fresh)

    async def _commit(self) -> None:
        if not (self._buffer if self._detector else self._received_samples):
            raise BadRequest("the input audio buffer is empty; append audio before committing",
                             code="input_audio_buffer_commit_empty")
        if self._detector is not None:
            self._detector.restart()  # the audio stream goes on; what follows is a new turn
        else:
            assert self._resampler is not None
            tail = self._resampler.flush()
            self._buffer += tail
            await self._sync_live(tail)
        await self._commit_buffer()

    async def _commit_buffer(self) -> None:
        item = Item(self._turn_item_id or new_id("item"), "user", [Audio(bytes(self._buffer))])
        if self._live is not None and self._live.item_id is None:
            self._live.item_id = item.id
        self._reset_buffer()
        previous_id = self.conversation.add(item)
        await self._send(self._events.buffer_committed(item.id, previous_id))
        for added in self._events.item_added(item, previous_id):
            await self._send(added)

    async def _clear(self) -> None:
        if self._live is not None and self._live.item_id is None:
            self._live.cancel()
            self._live = None
        if self._detector is not None:
            self._detector.restart()
        self._reset_buffer()
        await self._send(self._events.buffer_cleared())

    async def _detect_turns(self, detector: SpeechDetector, fresh: bytes) -> None:
        """Take `fresh` audio under turn detection: it joins the buffer piece by piece, and
        between the pieces speech starts or stops where the detector found it."""
        origin = detector.position  # where `fresh` begins in the session's audio
        taken = 0  # samples of `fresh` in the buffer
        for boundary in detector.feed(fresh):
            # a start may lie in a frame begun by earlier audio, already in the buffer
            upto = max(boundary.at - origin, taken)
            await self._take(fresh[2 * taken:2 * upto])
            taken = upto
            await self._at_boundary(boundary)
        await self._take(fresh[2 * taken:])

    async def _take(self, pcm: bytes) -> None:
        self._buffer += pcm
        if self._speaking:
            await self._sync_live(pcm)
            return
        # no speech yet: keep what the padding may need, and the detector's partial frame
        assert self.settings.turn_detection is not None
        keep = _samples(self.settings.turn_detection.prefix_padding_ms) + FRAME_SAMPLES
        self._drop_before(self._buffer_start + len(self._buffer) // 2 - keep)

    async def _at_boundary(self, boundary: Boundary) -> None:
        """Speech started: the turn's events and its live call; speech stopped: commit
        and respond. The gateway's detector is the one source of truth: the live call goes
        without the service's own silence watch (GenerateLiveStart.end_on_silence_ms),
        which would judge by its own level and frames and could end the input before the
        gateway saw the speech stop, dropping what follows; sending `end` here costs one
        message's trip."""
        vad = self.settings.turn_detection
        assert vad is not None
        if boundary.kind == "started":
            self._drop_before(boundary.at - _samples(vad.prefix_padding_ms))
            self._speaking = True
            self._turn_item_id = new_id("item")
            await self._send(self._events.speech_started(self._buffer_start,
                                                         self._turn_item_id))
            if self._run is not None and vad.interrupt_response:
                self._run.cancel("turn_detected")
            await self._sync_live()
            return
        assert self._turn_item_id is not None
        await self._send(self._events.speech_stopped(boundary.at, self._turn_item_id))
        if self._run is not None and self._run.cancel_requested and self._task is not None:
            await asyncio.wait({self._task})  # its item joins the conversation first
        await self._commit_buffer()
        if not vad.create_response:
            return
        if self._run is not None:  # interrupt_response off: the client may ask later
            log.info("realtime_turn_unanswered", response_id=self._run.response.id)
            return
        await self._create_response(ResponseCreate(type="response.create"))

    def _drop_before(self, sample: int) -> None:
        """Drop the buffer's audio before `sample` (an index in the session's audio)."""
        excess = min(sample - self._buffer_start, len(self._buffer) // 2)
        if excess > 0:
            del self._buffer[:2 * excess]
            self._buffer_start += excess

    async def _create_item(self, event: ItemCreate) -> None:
        item = to_item(event.item, item_id=event.item.id or new_id("item"),
                       input_rate_hz=self.settings.input_rate_hz, where="item")
        previous_id = self.conversation.add(item, event.previous_item_id)
        for added in self._events.item_added(item, previous_id):
            await self._send(added)
        await self._sync_live()

    async def _delete_item(self, event: ItemDelete) -> None:
        self.conversation.delete(event.item_id)
        await self._send(self._events.item_deleted(event.item_id))
        await self._sync_live()

    async def _create_response(self, event: ResponseCreate) -> None:
        if self._run is not None:
            raise BadRequest(f"response {self._run.response.id} is in progress; wait for its "
                             "response.done or send response.cancel",
                             code="conversation_already_has_active_response")
        params = event.response
        settings = response_settings(self.settings, params)
        in_conversation = params.conversation == "auto"
        if params.input is None:
            items = list(self.conversation.items)
        else:
            items = [to_item(param, item_id=param.id or new_id("item"),
                             input_rate_hz=self.settings.input_rate_hz,
                             where=f"response.input[{index}]")
                     for index, param in enumerate(params.input)]
        # the service's session follows the default conversation only
        session_id = self._session_id if in_conversation and params.input is None else ""
        call, path = await self._response_call(items, settings, session_id,
                                               own_input=params.input is not None)
        self._session_used |= bool(session_id)
        response = ResponseState(new_id("resp"), settings, params.metadata,
                                 self._conversation_id if in_conversation else None)
        self._run = run = ResponseRun(
            response, events=self._events, send=self._send,
            on_item=self.conversation.add if in_conversation else None,
            default_retry_after_s=self._config.default_retry_after_s, path=path)
        self._num_responses += 1
        self._task = asyncio.create_task(self._respond(run, call))

    async def _response_call(self, items: list[Item], settings: Settings, session_id: str,
                             *, own_input: bool) -> tuple[grpc.aio.Call, str]:
        """The finished GenerateLive call when it carries the last item and was opened
        with what this response asks for; else a Generate call."""
        live, self._live = self._live, None
        if (live is not None and not own_input and live.item_id is not None
                and items and items[-1].id == live.item_id):
            if not live.usable:  # the service ended it: say why, since Generate hides it
                log.warning("realtime_live_lost", request_id=live.request_id,
                            grpc_code=(await live.call.code()).name,
                            details=await live.call.details())
            elif live.basis == generate_request(items[:-1], settings, session_id=session_id):
                return live.finish(), "live"
        if live is not None:
            live.cancel()
        request = generate_request(items, settings, session_id=session_id)
        return self._upstream.generate(request, request_id=uuid.uuid4().hex), "generate"

    def _cancel_response(self, event: ResponseCancel) -> None:
        run = self._run
        if run is None or (event.response_id is not None
                           and event.response_id != run.response.id):
            raise BadRequest("there is no response in progress to cancel"
                             + (f" with id {event.response_id!r}" if event.response_id else ""),
                             param="response_id" if event.response_id else None,
                             code="response_cancel_not_active")
        run.cancel()

    async def _respond(self, run: ResponseRun, call: grpc.aio.Call) -> None:
        try:
            await run.run(call)
        except WebSocketDisconnect:
            return
        except Exception:  # a bug: logged here, since nobody awaits this task's result
            log.exception("realtime_response_crashed", response_id=run.response.id)
            return
        finally:
            self._run = None
            self._metrics.realtime_responses.labels(run.response.status, run.path).inc()
        await self._sync_live()  # speech that came during the response

    async def _sync_live(self, fresh: bytes = b"") -> None:
        """Keep a GenerateLive call in step with the uncommitted speech: opened with the
        request a response would make now for the conversation before it, fed the speech
        (`fresh`: what was just added to the buffer). A call for a committed item is kept
        while a response could still use it. None is opened while a response runs, since
        its item will join the conversation first."""
        live = self._live
        speech = self._speech()
        if live is not None and live.item_id is not None:
            if not speech and self._run is None and self.conversation.last_id == live.item_id:
                return
            live.cancel()
            self._live = live = None
        if self._run is not None or not speech:
            return
        # what the basis depends on, cheaper to compare than the basis with its audio
        made_for = (self.conversation.version, self.settings)
        if live is not None and live.made_for == made_for:
            if live.usable:
                live.feed(fresh)
                return
            if not await live.expired():
                return  # it failed for a reason sending again cannot mend; Generate will do
            log.info("realtime_live_reopened", request_id=live.request_id)
        if live is not None:
            live.cancel()
        timeout = self._config.request_timeout_s
        basis = generate_request(self.conversation.items, self.settings,
                                 session_id=self._session_id)
        self._live = LiveUpload(
            self._upstream, basis, made_for=made_for, chunk_ms=self._config.realtime_chunk_ms,
            request_id=uuid.uuid4().hex,
            timeout=None if timeout is None else timeout + MAX_BUFFER_S)
        self._metrics.realtime_live_streams.inc()
        self._live.call.add_done_callback(lambda _: self._metrics.realtime_live_streams.dec())
        self._live.feed(bytes(speech))

    def _speech(self) -> bytearray:
        """The uncommitted speech: the buffer, but under turn detection only once speech
        started in it (the silence kept before is not sent)."""
        return self._buffer if self._detector is None or self._speaking else bytearray()

    def _turn_open(self) -> bool:
        """The buffer holds a turn's audio: any under the client's commits, else speech."""
        return self._speaking if self._detector is not None else self._received_samples > 0

    def _reset_buffer(self) -> None:
        """Empty the buffer. Without turn detection the next append starts a new clip;
        with it the audio stream goes on through the same resampler and detector."""
        self._buffer_start += len(self._buffer) // 2
        self._buffer = bytearray()
        self._received_samples = 0
        self._speaking = False
        self._turn_item_id = None
        if self._detector is None:
            self._resampler = None

    def _restart_input(self) -> None:
        """The input's rate or turn detection changed (no turn open): the kept silence
        goes, a new resampler and detector take the audio from here."""
        self._reset_buffer()
        self._resampler = None
        vad = self.settings.turn_detection
        self._detector = None if vad is None else SpeechDetector(
            vad, max_turn_samples=_samples(MAX_BUFFER_S * 1000) - _samples(vad.prefix_padding_ms),
            position=self._buffer_start)

    async def _send(self, event: Event) -> None:
        async with self._send_lock:
            await self._websocket.send_text(json.dumps(event, ensure_ascii=False))

    async def _close(self) -> None:
        """The client left: cancel whatever runs upstream and drop the service's session."""
        if self._run is not None:
            self._run.cancel()
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        if self._live is not None:
            self._live.cancel()
        if self._session_used:
            with contextlib.suppress(grpc.aio.AioRpcError):
                await self._upstream.end_session(self._session_id)
        log.info("realtime_session", responses=self._num_responses,
                 items=len(self.conversation.items))
