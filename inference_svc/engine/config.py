"""The engine's settings: admission, batching, the KV budget and image budgets."""

from __future__ import annotations

from dataclasses import dataclass

from autoglm_settings import MIB, setting


@dataclass(frozen=True)
class EngineConfig:
    max_queued: int = setting(64, help="requests waiting for admission before "
                                       "RESOURCE_EXHAUSTED")
    max_batch: int = setting(16, help="most sequences decoded together")
    # None: the model's own default (its `default_max_pixels`)
    max_pixels: int | None = setting(None, shown="5000000 GLM-4.1V, 1003520 bundles", help=(
        "pixel budget per image (for GLM-4.1V the processor's max_pixels, as vLLM's "
        "mm_processor_kwargs)"))
    # 256*28*28
    pressure_max_pixels: int = setting(200_704, help="pixel budget per image while under "
                                                     "memory pressure")
    pressure_fraction: float = setting(0.9, help="share of the KV budget in use above which "
                                                 "the service is under memory pressure")
    queue_timeout_s: float = setting(30.0, name="queue_timeout", help=(
        "seconds a new request may wait for admission before RESOURCE_EXHAUSTED "
        "(preempted requests wait as long as it takes)"))
    kv_budget_bytes: int = setting(2 * 1024**3, name="kv_budget_mb", unit=MIB, help=(
        "KV cache budget (running requests + idle sessions), in MiB"))
    activation_budget_bytes: int = setting(1024**3, name="activation_budget_mb", unit=MIB,
                                           help="most encoder activation memory one "
                                                "request's media may need, in MiB")
    session_idle_ttl_s: float = setting(600.0, name="session_idle_ttl",
                                        help="seconds an idle session's KV is kept")
    prefix_caching: bool = setting(True, help="reuse KV across requests with the same "
                                              "prefix (off: only within a session id)")
    # None: default_prefill_chunk(the model's device), resolved by the Engine
    prefill_chunk_tokens: int | None = setting(None, shown="128 CPU, 2048 CUDA", help=(
        "prompt positions per prefill pass (a prompt's tail under half of it joins "
        "the pass before); a cancel or deadline stops the prefill between chunks "
        "(0: whole prompt at once)"))
    mixed_steps: bool = setting(True, help=(
        "while prompts are in flight, feed their chunks and the decode rows through one "
        "forward (off: a prefill pass, then a decode step, which on a GPU replays its "
        "CUDA graph)"))
    kv_block_tokens: int = setting(16, help="token positions per KV block (the unit of "
                                            "allocation, sharing and prefix caching)")
    # None: torch's default count (engine/compute_threads.py)
    compute_threads: int | None = setting(None, shown="all cores", help=(
        "CPU threads of the model loop's torch work (the server's other threads compute "
        "on one each)"))
    cuda_graphs: bool = setting(True, help=(
        "replay decode steps as CUDA graphs captured per batch size and context bucket "
        "(where the KV pool is on one GPU; off: eager steps)"))
    host_compile: bool = setting(False, help=(
        "compile decode steps on the CPU with torch.compile at start-up: fused kernels in "
        "place of ~50 small operations a layer (the embedded default, one stream on 2 "
        "cores: ~1.25-1.7x in int8, ~1.3-1.5x in int4, ~1.05-1.4x in fp32); start-up takes "
        "~1.5-2 min longer the first time, ~25 s once inductor's cache "
        "(TORCHINDUCTOR_CACHE_DIR) holds the graphs; where the decoder runs wholly on the "
        "host"))
    paged_attention: str = setting("gather", choices=("gather", "flex"), help=(
        "how decode steps read the KV pool: gather copies each row's keys into a dense "
        "tensor; flex attends over the pool in place through a block mask from the block "
        "tables (compiled flex_attention; GPU pools only; steps eagerly, no CUDA graphs)"))

    def __post_init__(self) -> None:
        if self.max_queued < 1:
            raise ValueError("max queued must be at least 1")
        if self.max_batch < 1:
            raise ValueError("max batch must be at least 1")
        if not 4096 <= self.pressure_max_pixels <= (self.max_pixels or self.pressure_max_pixels):
            raise ValueError("pressure max pixels must be in [4096, max pixels]")
        if not 0 < self.pressure_fraction <= 1:
            raise ValueError("pressure fraction must be in (0, 1]")
        if self.queue_timeout_s <= 0:
            raise ValueError("queue timeout must be positive")
        if self.prefill_chunk_tokens is not None and self.prefill_chunk_tokens < 0:
            raise ValueError("prefill chunk tokens must not be negative")
        if self.kv_budget_bytes < 64 * 1024:
            raise ValueError("KV budget must be at least 64 KiB")
        if self.session_idle_ttl_s < 0:
            raise ValueError("session idle TTL must not be negative")
        if not 1 <= self.kv_block_tokens <= 1024:
            raise ValueError("KV block tokens must be in [1, 1024]")
        if self.compute_threads is not None and self.compute_threads < 1:
            raise ValueError("compute threads must be at least 1")


def default_prefill_chunk(device: str) -> int:
    """Prompt positions per prefill pass when not configured: small enough that a cancel
    or deadline stops the work within a fraction of a second (measured on the embedded
    default, 2 CPU cores: a 128-position chunk takes up to 0.2 s early in a 7,000-token
    prompt, 256 up to 0.5 s), large enough that a GPU keeps its throughput."""
    return 2048 if device.startswith("cuda") else 128
