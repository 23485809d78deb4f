"""Whether a model fits a set of cards, and at which weight precisions.

Each card holds its weights, its share of the KV cache, and:
  - RUNTIME_BYTES for the CUDA context and the work around the weights;
  - the memory daemon's reserve: the daemon pauses admission once a card's use passes
    its hard mark (memd `policy.hard_enter`), so a plan keeps its agents under it;
  - on the card that holds the vision encoder, its activations for one screenshot.
With several cards the decoder's layers are split evenly in order, the first card also
holding the token embedding and the last the final norm and LM head; each card's KV holds
its own layers' K and V, so every token costs each card its layers' share. The encoders
go to the card with the most room after its decoder share (the last one on a tie).

The precisions are tried best first, the decoder's before the vision tower's: decoder
full (bf16) > fp8 (when the card runs it) > int8 > int4, vision full > int8; the first
that holds the asked agents at the asked context is the plan.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from inference_svc.model.sizing.model_spec import ModelSpec
from inference_svc.model.sizing.weights import (
    held_tensors,
    kv_element,
    tensor_bytes,
    weight_bytes,
)

GIB = 1024**3
# Per card: the CUDA context and cuBLAS workspaces (~0.5 GiB before any tensor), the
# decode steps' CUDA graphs, allocator slack, and one prefill chunk's decoder
# activations (~0.2 GiB for GLM-4.1V-9B at 2,048 positions). On a host without a GPU the
# same figure stands for the process's own libraries and buffers.
RUNTIME_BYTES = int(1.25 * GIB)
# The daemon's default hard mark is 0.92 of a card (memd --hard-enter; the service talks
# to the daemon over gRPC only, so the number is repeated here, and a test compares them).
RESERVE_FRACTION = 0.08
DECODER_QUANTIZED = ("int8", "int4")
VISION_QUANTIZED = ("int8",)


class PlanError(ValueError):
    """No plan: the reason in plain words."""


@dataclass(frozen=True)
class Cards:
    count: int  # GPUs; 0: the host's own memory
    memory_bytes: int  # of each
    reserve_fraction: float = RESERVE_FRACTION

    @property
    def devices(self) -> list[str]:
        return ["cpu"] if self.count == 0 else [f"cuda:{i}" for i in range(self.count)]

    def __str__(self) -> str:
        size = f"{self.memory_bytes / GIB:g} GiB"
        return f"a host with {size}" if self.count == 0 else f"{self.count} x {size}"


@dataclass(frozen=True)
class CardLoad:
    device: str
    memory_bytes: int
    layers: tuple[int, int]  # the decoder layers it holds: [first, stop)
    weights: dict[str, int]  # module -> bytes on this card
    runtime_bytes: int
    activation_bytes: int
    reserve_bytes: int
    kv_bytes_per_token: int  # its layers' K and V per token
    free_bytes: int = field(init=False)  # left for KV; negative when overfull

    def __post_init__(self) -> None:
        object.__setattr__(self, "free_bytes", self.memory_bytes - sum(self.weights.values())
                           - self.runtime_bytes - self.activation_bytes - self.reserve_bytes)

    @property
    def kv_tokens(self) -> int | None:
        if not self.kv_bytes_per_token:
            return None
        return max(0, self.free_bytes) // self.kv_bytes_per_token


@dataclass(frozen=True)
class Layout:
    decoder: str  # precision
    vision: str
    cards: list[CardLoad]
    weights: dict[str, int]  # module -> bytes over all cards
    kv_bytes_per_token: int

    @property
    def kv_tokens(self) -> int:
        """Tokens of KV every card has room for."""
        return min(c.kv_tokens for c in self.cards if c.kv_tokens is not None)

    @property
    def kv_budget_bytes(self) -> int:
        return self.kv_tokens * self.kv_bytes_per_token

    def agents(self, context: int) -> int:
        return self.kv_tokens // context


def even_split(layers: int, cards: int) -> list[tuple[int, int]]:
    bounds, start = [], 0
    for i in range(cards):
        stop = start + layers // cards + (1 if i < layers % cards else 0)
        bounds.append((start, stop))
        start = stop
    return bounds


def layout(spec: ModelSpec, cards: Cards, decoder: str, vision: str) -> Layout:
    devices = cards.devices
    last = len(devices) - 1
    bounds = even_split(spec.kv.layers, len(devices))
    card_of_layer = {layer: i for i, (start, stop) in enumerate(bounds)
                     for layer in range(start, stop)}
    decoder_on = [0] * len(devices)
    on_host = cards.count == 0
    element = kv_element(decoder, spec.full, host=on_host)
    for tensor in held_tensors(spec.tensors.modules["decoder"], decoder, host=on_host):
        if tensor.layer is not None:
            i = card_of_layer[tensor.layer]
        else:
            i = 0 if tensor.role == "embedding" else last
        decoder_on[i] += tensor_bytes(tensor, decoder, spec.full, host=on_host)
    precisions = {"decoder": decoder, "vision": vision}
    weights = {"decoder": sum(decoder_on)}
    for name, tensors in spec.tensors.modules.items():
        if name != "decoder":
            weights[name] = weight_bytes(tensors, precisions.get(name, spec.full), spec.full,
                                         host=on_host)
    encoders = sum(weights.values()) - weights["decoder"]
    runtime, reserve = RUNTIME_BYTES, int(cards.memory_bytes * cards.reserve_fraction)
    room = [cards.memory_bytes - d - runtime - reserve for d in decoder_on]
    host = max(range(len(devices)), key=lambda i: (room[i], i))
    loads = []
    for i, device in enumerate(devices):
        here = {"decoder": decoder_on[i]}
        if i == host:
            here.update({name: size for name, size in weights.items() if name != "decoder"})
        start, stop = bounds[i]
        loads.append(CardLoad(
            device=device, memory_bytes=cards.memory_bytes, layers=(start, stop),
            weights=here, runtime_bytes=runtime,
            activation_bytes=spec.vision_activation_bytes if i == host and encoders else 0,
            reserve_bytes=reserve,
            kv_bytes_per_token=(stop - start) * spec.kv.bytes_per_token_per_layer(element)))
    return Layout(decoder, vision, loads, weights, spec.kv.bytes_per_token(element))


def candidates(spec: ModelSpec, *, fp8: bool) -> list[tuple[str, str]]:
    """(decoder, vision) precisions, best first."""
    decoders = [spec.full, *(["fp8"] if fp8 else []), *DECODER_QUANTIZED]
    visions = [spec.full, *VISION_QUANTIZED] if "vision" in spec.tensors.modules else [spec.full]
    return [(d, v) for d in decoders for v in visions]


def choose(spec: ModelSpec, cards: Cards, *, context: int, agents: int = 1,
           fp8: bool = False) -> Layout:
    """The best precisions at which `agents` sessions of `context` tokens fit at once."""
    if context > spec.context:
        raise PlanError(f"a context of {context:,} tokens is longer than {spec.name}'s own "
                        f"({spec.context:,} tokens)")
    smallest = None
    for decoder, vision in candidates(spec, fp8=fp8):
        smallest = layout(spec, cards, decoder, vision)
        if smallest.kv_tokens >= agents * context:
            return smallest
    assert smallest is not None
    raise PlanError(refusal(spec, cards, smallest, context=context, agents=agents))


def gib(count: int) -> str:
    return f"{count / GIB:.2f} GiB"


def refusal(spec: ModelSpec, cards: Cards, smallest: Layout, *, context: int,
            agents: int) -> str:
    tight = min((c for c in smallest.cards if c.kv_tokens is not None),
                key=lambda c: c.kv_tokens or 0)
    need = agents * context * tight.kv_bytes_per_token
    sessions = (f"{agents} agents at {context:,} tokens need" if agents > 1
                else f"one agent at {context:,} tokens needs")
    vision = f", vision {smallest.vision}" if "vision" in smallest.weights else ""
    if tight.free_bytes > 0:
        left = f"which leaves {gib(tight.free_bytes)}"
        remedy = "a larger card, more cards (--gpus), a shorter --context or fewer --agents"
    else:
        left = f"which leaves nothing ({gib(-tight.free_bytes)} short)"
        remedy = "a larger card or more cards (--gpus)"
    return (
        f"{spec.name} does not fit {cards}: {sessions} {gib(need)} of KV cache on "
        f"{tight.device}, and even with the smallest weights (decoder {smallest.decoder}"
        f"{vision}) its {gib(tight.memory_bytes)} hold {gib(sum(tight.weights.values()))} "
        f"of weights, {gib(tight.runtime_bytes)} of runtime overhead, "
        f"{gib(tight.activation_bytes)} of vision activations and the memory daemon's "
        f"reserve of {gib(tight.reserve_bytes)}, {left}. It would take {remedy}."
    )
