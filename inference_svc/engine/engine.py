"""The engine's asyncio face: validation, preparation, admission, accounting.

Transports call `submit()` and iterate the handle's events; the model thread
(model_loop.ModelLoop) never touches asyncio objects except through
`loop.call_soon_threadsafe`.
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import threading
import time
import weakref
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace

import structlog

from inference_svc.engine.compute_threads import use_compute_threads
from inference_svc.engine.config import EngineConfig, default_prefill_chunk
from inference_svc.engine.constraints import GrammarCompiler
from inference_svc.engine.jobs import Admission, Failed, RequestHandle, RunningInfo
from inference_svc.engine.kv_blocks import BlockLedger, KVAccount
from inference_svc.engine.kv_pool_sizing import (
    GRAPH_ALLOWANCE,
    CardRoom,
    block_bytes_by_device,
    blocks_that_fit,
    cuda_devices,
    reserved_bytes,
)
from inference_svc.engine.live_prompt import LivePrompt
from inference_svc.engine.logprobs import MAX_TOP_LOGPROBS
from inference_svc.engine.model_loop import ModelLoop
from inference_svc.engine.sequences import Job
from inference_svc.engine.sessions import SessionStore
from inference_svc.errors import ContextTooLong, InvalidRequest, NotReady, ResourceExhausted
from inference_svc.model.base import PagedDecoder
from inference_svc.model.inputs.live_audio import LiveAudio
from inference_svc.model.inputs.prompt import PromptPlan
from inference_svc.model.modular import DecodedMedia
from inference_svc.model.paged.flex_decode import check_served
from inference_svc.model.paged.kv_pool import KVPool
from inference_svc.types import GenerationRequest, SamplingParams

log = structlog.get_logger(__name__)

__all__ = ["Admission", "Engine", "EngineConfig", "RequestHandle", "RunningInfo",
           "default_prefill_chunk"]


class Engine:
    def __init__(self, model, config: EngineConfig, observer=None) -> None:
        if config.prefill_chunk_tokens is None:
            config = replace(config, prefill_chunk_tokens=default_prefill_chunk(model.device))
        self.model = model
        self.config = config
        self.max_pixels = config.max_pixels or model.default_max_pixels
        if not isinstance(model, PagedDecoder):
            raise TypeError(f"{type(model).__name__} does not run on paged KV")
        pool = model.new_kv_pool(block_size=config.kv_block_tokens, blocks=1)
        self.ledger = BlockLedger(pool, budget_blocks=max(
            2, config.kv_budget_bytes // pool.bytes_per_block))
        check_served(config.paged_attention, pool.layer_devices)
        if cuda_devices(pool):
            self._size_gpu_pool(pool, config)
        model.read_kv_by(config.paged_attention)
        captured = model.capture_decode_steps(pool, config.max_batch if config.cuda_graphs else 0)
        log.info("decode_steps", paged_attention=config.paged_attention, cuda_graphs=captured)
        if captured:
            started = time.perf_counter()
            memory = reserved_bytes(pool)
            graphs = model.capture_ahead(pool)
            log.info("decode_graphs_ready", graphs=graphs,
                     seconds=round(time.perf_counter() - started, 2),
                     bytes=reserved_bytes(pool) - memory)
        if config.host_compile:
            self._compile_host_steps(model, pool, config)
        self.sessions = SessionStore(
            self.ledger, idle_ttl_s=config.session_idle_ttl_s, device=model.device,
            prefix_caching=config.prefix_caching)
        self._loop = ModelLoop(model, config, self.sessions, self.ledger, observer)
        self._handles: weakref.WeakSet[RequestHandle] = weakref.WeakSet()
        self._live_audio = 0  # live audio streams open (GenerateLive before its end)
        self._live_audio_lock = threading.Lock()
        self.closed = False
        self.grammars = GrammarCompiler(
            model.tokenizer, vocab_size=int(getattr(model.config, "vocab_size", 0) or 0),
            eos_ids=model.eos_token_ids)

    @staticmethod
    def _compile_host_steps(model: PagedDecoder, pool: KVPool, config: EngineConfig) -> None:
        """Compile the host decode step before the first request, on the threads the
        model loop computes on (inductor sizes its kernels' thread teams by them)."""
        started = time.perf_counter()
        with ThreadPoolExecutor(1, initializer=use_compute_threads,
                                initargs=(config.compute_threads,)) as thread:
            compiled = thread.submit(model.compile_host_steps, pool).result()
        log.info("host_compile", compiled=compiled,
                 seconds=round(time.perf_counter() - started, 1))

    def _size_gpu_pool(self, pool: KVPool, config: EngineConfig) -> None:
        """The pool at the most blocks the cards hold, once (engine/kv_pool_sizing.py)."""
        rooms = [CardRoom.read(device) for device in cuda_devices(pool)]
        asked = self.ledger.budget_blocks
        blocks = blocks_that_fit(asked, block_bytes_by_device(pool), rooms,
                                 config.activation_budget_bytes + GRAPH_ALLOWANCE)
        self.ledger.preallocate(blocks)
        sizes = {room.device: {"free_gib": round(room.free_bytes / 2**30, 2)}
                 for room in rooms}
        if blocks < asked:
            log.warning("kv_budget_clamped", asked_blocks=asked, blocks=blocks, cards=sizes,
                        reason="the cards cannot hold the configured --kv-budget-mb")
        log.info("kv_pool_sized", blocks=blocks, tokens=blocks * pool.block_size,
                 bytes=blocks * pool.bytes_per_block, cards=sizes)

    def start(self) -> None:
        self._loop.start()

    def stop(self, timeout: float = 10.0) -> None:
        """End the loop: what still runs or waits ends with CANCELLED and its usage."""
        self.closed = True
        self._loop.stop(timeout)

    def close(self) -> None:
        """Refuse new requests (shutdown has begun); those admitted go on."""
        self.closed = True

    @property
    def idle(self) -> bool:
        return not self._loop.busy

    def fault(self, stall_timeout_s: float) -> str | None:
        """Why the model loop cannot serve (dead, or stalled with work pending), or None."""
        if not self._loop.alive:
            return "the model loop has stopped"
        silent = time.monotonic() - self._loop.heartbeat
        if silent > stall_timeout_s and self._loop.busy:
            return f"the model loop made no progress for {silent:.1f} s with work pending"
        return None

    def fail_all(self, error: Exception) -> int:
        """End every open request with `error` (the loop can no longer serve them)."""
        open_handles = [h for h in list(self._handles) if not h.ended]
        for handle in open_handles:
            handle.cancel()
            handle.push(Failed(error))
        return len(open_handles)

    # ---- requests ---------------------------------------------------------------

    async def submit(self, request: GenerationRequest) -> RequestHandle:
        request, media, plan, max_new = await self._admissible(request)
        return self._enqueue(Job((0, 0), request, plan, media, max_new))

    async def submit_live(self, request: GenerationRequest) -> tuple[RequestHandle, LiveAudio]:
        """A request whose last user message ends with speech still arriving (a live
        AudioPart): it is queued now, and prefills the speech as it is appended to the
        LiveAudio returned, up to the context (`LiveAudio.max_samples`)."""
        request, media, base, max_new = await self._admissible(request)
        model = self.model
        audio = model.live_audio(secrets.token_bytes(16))  # no other prompt shares its KV
        audio.on_input = self._loop.requests.wake
        room = model.context_length - len(base.input_ids) - 1
        audio.max_samples = room * audio.chunking.token_samples
        live = LivePrompt(base, audio, model.placeholder_id, model.context_length)
        return self._enqueue(Job((0, 0), request, live.plan(), media, max_new, live=live)), audio

    def _enqueue(self, job: Job) -> RequestHandle:
        job.handle = handle = RequestHandle(job.request, asyncio.get_running_loop())
        self._loop.requests.put(job)
        self._handles.add(handle)
        return handle

    async def _admissible(self, request: GenerationRequest
                          ) -> tuple[GenerationRequest, DecodedMedia, PromptPlan, int]:
        """The request checked and prepared: its media, prompt plan and token limit."""
        if self.closed or self._loop.requests.stopping:
            raise NotReady("the service is shutting down")
        validate(request)
        request = normalized(request)
        request = await self._with_grammar(request)
        media, plan = await asyncio.to_thread(self._prepare, request)
        context = self.model.context_length
        prompt_tokens = len(plan.input_ids)
        if prompt_tokens >= context:
            raise ContextTooLong(
                f"prompt is {prompt_tokens} tokens; the context length is {context}",
                field="messages",
            )
        max_new = min(request.sampling.max_new_tokens, context - prompt_tokens)
        needed = self.kv_estimate(prompt_tokens, max_new)
        if needed > self.config.kv_budget_bytes:
            raise ResourceExhausted(
                f"request needs {needed} bytes of KV cache (prompt {prompt_tokens} + "
                f"max_new_tokens {max_new}); the KV budget is {self.config.kv_budget_bytes}",
                resource="kv_cache", retry_after_s=0.0,
            )
        activations = self.model.activation_bytes(media)
        if activations > self.config.activation_budget_bytes:
            raise ResourceExhausted(
                f"the request's images and audio need about {activations} bytes of encoder "
                f"activations; the limit is {self.config.activation_budget_bytes} "
                f"(send fewer or shorter media)",
                resource="encoder_activations", retry_after_s=0.0,
            )
        return request, media, plan, max_new

    async def _with_grammar(self, request: GenerationRequest) -> GenerationRequest:
        """Compile the request's response format here, off the model thread (cached by
        content, so a repeated schema costs a lookup)."""
        sampling = request.sampling
        if sampling.response_format is None:
            return request
        grammar = await asyncio.to_thread(self.grammars.compile, sampling.response_format)
        return replace(request, grammar=grammar)

    def under_pressure(self) -> bool:
        """Admission restricted (by the daemon or an operator), or the KV budget nearly full."""
        if self.admission.mode != "open":
            return True
        return self.kv_account().held_bytes > (
            self.config.pressure_fraction * self.config.kv_budget_bytes)

    def max_pixels_now(self) -> int:
        if self.under_pressure():
            return min(self.config.pressure_max_pixels, self.max_pixels)
        return self.max_pixels

    def _prepare(self, request: GenerationRequest) -> tuple[DecodedMedia, PromptPlan]:
        budget = self.max_pixels_now()
        media = self.model.decode_media(request.messages, max_pixels=budget)
        if budget < self.max_pixels:  # the usage says each image was cut for memory
            media.images[:] = [replace(image, reduced_under_pressure=True)
                               for image in media.images]
        plan = self.model.plan(request.messages, media, enable_thinking=request.enable_thinking)
        return media, plan

    async def count_tokens(self, messages, *, enable_thinking: bool) -> PromptPlan:
        probe = GenerationRequest("count", messages, SamplingParams(),
                                  enable_thinking=enable_thinking)
        validate(probe)
        _, plan = await asyncio.to_thread(self._prepare, probe)
        return plan

    def kv_estimate(self, prompt_tokens: int, max_new_tokens: int) -> int:
        return self._loop.kv_estimate(prompt_tokens, max_new_tokens)

    def end_session(self, session_id: str) -> int | None:
        """Drop a session's cached state; None when the session is unknown."""
        return self.on_model_thread(lambda: self._shrunk(self.sessions.end(session_id)))

    def on_model_thread(self, work):
        """Run `work` between model steps: KV blocks belong to the model thread."""
        return self._loop.call(work)

    def _shrunk(self, result):
        """Give back the pool's free tail after KV was let go."""
        self.ledger.shrink()
        return result

    def trim_kv(self, policy: str, target_bytes: int, max_tokens: int):
        """Let go of idle KV: LRU down to a target, all of it, truncate each session to
        `max_tokens`, or copy sessions to host memory; returns the store's TrimResult."""
        def work():
            store = self.sessions
            if policy == "truncate":
                result = store.truncate_all(max_tokens)
            elif policy == "offload":
                result = store.offload_to("cpu")
            else:
                result = store.evict_lru(0 if policy == "all" else target_bytes)
            return self._shrunk(result)

        return self.on_model_thread(work)

    def kv_account(self) -> KVAccount:
        """The KV ledger as of the last model step."""
        return self._loop.kv_account

    @property
    def preemptions(self) -> int:
        return self._loop.requests.preemptions

    @property
    def swaps(self) -> int:
        return self._loop.swaps

    # ---- admission and accounting -------------------------------------------------

    @property
    def admission(self) -> Admission:
        return self._loop.requests.admission

    def set_admission(self, admission: Admission) -> None:
        self._loop.requests.set_admission(admission)
        log.info("admission_changed", mode=admission.mode, max_running=admission.max_running)

    def running(self) -> list[RunningInfo]:
        requests = self._loop.requests
        with requests.lock:
            return [RunningInfo(**vars(info)) for info in requests.running.values()]

    @property
    def queued(self) -> int:
        return self._loop.requests.queued

    @property
    def completed(self) -> int:
        return self._loop.requests.completed

    def modalities_in_use(self) -> set[str]:
        """Modalities of running requests, and audio while a live audio stream is open:
        its encoder is needed as soon as the utterance ends, so it is not offloaded."""
        requests = self._loop.requests
        with requests.lock:
            used = set().union(*(info.modalities for info in requests.running.values()))
        if self._live_audio:
            used.add("audio")
        return used

    @contextlib.contextmanager
    def live_audio(self) -> Iterator[None]:
        """While open, a live audio stream keeps the audio encoder in use."""
        with self._live_audio_lock:
            self._live_audio += 1
        try:
            yield
        finally:
            with self._live_audio_lock:
                self._live_audio -= 1


ROLES = {"system", "user", "assistant"}
# Below this a temperature means greedy decoding (vLLM's rule): dividing scores by a
# smaller one overflows them to infinity.
GREEDY_BELOW_TEMPERATURE = 1e-5
# A repetition penalty divides or multiplies scores; far below 1 it overflows them.
MIN_REPETITION_PENALTY = 0.01
# Most choices one request may ask for (GenerateRequest.n).
MAX_CHOICES = 8


def normalized(request: GenerationRequest) -> GenerationRequest:
    """The request as the sampler runs it: a near-zero temperature is greedy."""
    sampling = request.sampling
    if 0 < sampling.temperature < GREEDY_BELOW_TEMPERATURE:
        return replace(request, sampling=replace(sampling, temperature=0.0))
    return request


def validate(request: GenerationRequest) -> None:
    if not request.messages:
        raise InvalidRequest("messages must not be empty", field="messages")
    for i, message in enumerate(request.messages):
        if message.role not in ROLES:
            raise InvalidRequest(f"messages[{i}].role must be system, user or assistant",
                                 field=f"messages[{i}].role")
        if not message.parts:
            raise InvalidRequest(f"messages[{i}].parts must not be empty",
                                 field=f"messages[{i}].parts")
    s = request.sampling
    checks = [
        (1 <= request.n <= MAX_CHOICES, "n", f"must be in [1, {MAX_CHOICES}]"),
        (s.max_new_tokens >= 1, "sampling.max_new_tokens", "must be at least 1"),
        (s.max_new_tokens <= 32_768, "sampling.max_new_tokens", "must be at most 32768"),
        (0 <= s.temperature <= 2, "sampling.temperature", "must be in [0, 2]"),
        (0 < s.top_p <= 1, "sampling.top_p", "must be in (0, 1]"),
        (s.top_k >= 0, "sampling.top_k", "must not be negative"),
        (MIN_REPETITION_PENALTY <= s.repetition_penalty <= 10, "sampling.repetition_penalty",
         f"must be in [{MIN_REPETITION_PENALTY}, 10]"),
        (-2 <= s.frequency_penalty <= 2, "sampling.frequency_penalty", "must be in [-2, 2]"),
        (-2 <= s.presence_penalty <= 2, "sampling.presence_penalty", "must be in [-2, 2]"),
        (len(s.stop_sequences) <= 16, "sampling.stop_sequences", "at most 16 are allowed"),
        (all(0 < len(x) <= 256 for x in s.stop_sequences), "sampling.stop_sequences",
         "each must be 1 to 256 characters"),
        (s.logprobs is None or 0 <= s.logprobs <= MAX_TOP_LOGPROBS, "sampling.logprobs",
         f"must be in [0, {MAX_TOP_LOGPROBS}]"),
    ]
    for ok, name, message in checks:
        if not ok:
            raise InvalidRequest(f"{name} {message}", field=name)
