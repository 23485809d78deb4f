"""The decoder side of paged KV, shared by every model: pool geometry and the forwards.

A model using it has a `decoder_unit` holding a transformers model for causal LM (the
whole multimodal model is fine: it takes `inputs_embeds` and rope `position_ids` and
never runs an encoder itself), its text `config`, a `dtype`, and names the attention
layers in `_decoder_layers`.
"""

from __future__ import annotations

import structlog
import torch
from torch import nn

from inference_svc.model.paged.decode_graphs import CaptureFailed, DecodeGraphs
from inference_svc.model.paged.flex_decode import (
    PAGED_ATTENTION,
    FlexPagedStep,
    flex_decode_attention,
)
from inference_svc.model.paged.host_compile import CompiledDecode, warm
from inference_svc.model.paged.kv_pool import KVPool, PagedStep, RowSlots
from inference_svc.model.paged.lean_forward import (
    Architecture,
    HostDecoders,
    lean_decode,
    lean_segments,
)
from inference_svc.model.paged.segment_step import SegmentStep, segment_attention
from inference_svc.model.units import ModuleUnit

log = structlog.get_logger(__name__)


class PagedForward:
    decoder_unit: ModuleUnit
    dtype: torch.dtype  # the decoder's activations
    kv_dtype: torch.dtype  # its KV cache (model/precision.py `kv_dtype`)
    config: object  # the decoder's (text) config
    decode_graphs: DecodeGraphs | None = None
    paged_attention: str = "gather"  # decode steps: "gather" or "flex" (flex_decode.py)
    _host_decoders: HostDecoders | None = None
    _compiled_decode: CompiledDecode | None = None  # host decode steps, where compiled

    @staticmethod
    def _decoder_layers(decoder: nn.Module) -> list[nn.Module]:
        raise NotImplementedError

    @property
    def _kv_heads(self) -> int:
        return getattr(self.config, "num_key_value_heads", None) or (
            self.config.num_attention_heads)

    @property
    def _head_dim(self) -> int:
        return getattr(self.config, "head_dim", None) or (
            self.config.hidden_size // self.config.num_attention_heads)

    def kv_bytes_per_token(self) -> int:
        element = torch.tensor([], dtype=self.kv_dtype).element_size()
        return 2 * self.config.num_hidden_layers * self._kv_heads * self._head_dim * element

    def new_kv_pool(self, *, block_size: int, blocks: int) -> KVPool:
        """Block storage for this decoder's KV, each layer's on that layer's device."""
        with self.decoder_unit.use() as decoder:
            devices = [str(layer.input_layernorm.weight.device)
                       for layer in self._decoder_layers(decoder)]
        return KVPool(layer_devices=devices, kv_heads=self._kv_heads, head_dim=self._head_dim,
                      dtype=self.kv_dtype, block_size=block_size, blocks=blocks,
                      zeroed=self.paged_attention == "flex")

    def forward_paged(self, pool: KVPool, segments: list[RowSlots],
                      inputs: list[torch.Tensor],
                      positions: list[torch.Tensor | None] | None = None) -> torch.Tensor:
        """One decoder pass over the new tokens of several sequences, KV in `pool`:
        prompt chunks and decode rows alike, packed end to end (model/paged/segment_step.py).

        `inputs[i]` holds segment i's new tokens: token ids [n], or decoder input
        embeddings [n, hidden] (a prompt with media); `positions[i]`, where given, their
        rope positions [axes, n]. Returns the logits after each segment's last token
        [segments, vocab].
        """
        step = SegmentStep(pool, segments, positions)
        with self.decoder_unit.use() as decoder, torch.inference_mode():
            table = decoder.get_input_embeddings()
            device = table.weight.device
            embeds = torch.cat([table(x.to(device)) if x.dtype == torch.long
                                else x.to(device, self.dtype) for x in inputs])
            lean = self._lean_architecture(decoder, pool)
            if lean is not None:
                return lean_segments(decoder, lean, step, embeds[None])
            with segment_attention(self._decoder_layers(decoder)):
                out = decoder(inputs_embeds=embeds[None],
                              position_ids=step.positions.to(device), cache=step,
                              paged_step=step, use_cache=False,
                              logits_to_keep=torch.tensor(step.last, device=device))
            return out.logits[0]

    def decode_paged(self, pool: KVPool, tables: list[list[int]], lengths: list[int],
                     tokens: list[int], offsets: list[int] | None = None) -> torch.Tensor:
        """One decode step: sequence b feeds `tokens[b]` at slot `lengths[b]` of its
        blocks `tables[b]`, at rope position `lengths[b] + offsets[b]`. Returns
        next-token logits [sequences, vocab]."""
        with self.decoder_unit.use() as decoder, torch.inference_mode():
            table = decoder.get_input_embeddings()
            if self.paged_attention == "flex":
                return self._flex_decode(decoder, pool, tables, lengths, tokens, offsets)
            if self.decode_graphs is not None and len(tokens) <= self.decode_graphs.max_rows:
                try:
                    return self.decode_graphs.step(
                        pool, table, lambda step, embeds: self._run_decoder(decoder, step, embeds),
                        tables, lengths, tokens, offsets, self.dtype, self.placeholder_id)
                except CaptureFailed as error:  # this model steps eagerly from now on
                    log.warning("decode_graphs_off", error=str(error))
                    self.decode_graphs = None
            step = PagedStep.decode(pool, tables, lengths, self.dtype, offsets)
            embeds = table(torch.tensor(tokens, dtype=torch.long, device=table.weight.device))
            lean = self._lean_architecture(decoder, pool)
            if lean is not None:
                return self._lean_decode(decoder, lean, step, embeds[:, None])
            return self._run_decoder(decoder, step, embeds[:, None])

    def _lean_decode(self, decoder: nn.Module, lean: Architecture, step: PagedStep,
                     embeds: torch.Tensor) -> torch.Tensor:
        """The lean step, compiled where it was for this decoder. A compiled step that
        fails (a recompile without a working compiler, an inductor error) turns compiled
        steps off and runs eagerly: the KV slots it may have written are written again."""
        compiled = self._compiled_decode
        if compiled is not None and compiled.serves(decoder):
            try:
                return compiled(decoder, lean, step, embeds)
            except Exception as error:
                first_line = next(iter(str(error).splitlines()), "")
                log.warning("host_compile_off", error=f"{type(error).__name__}: {first_line}")
                self._compiled_decode = None
        return lean_decode(decoder, lean, step, embeds)

    def compile_host_steps(self, pool: KVPool) -> bool:
        """Compile the lean decode step (model/paged/host_compile.py) and run it once for
        every graph it needs; False, and eager steps, where steps on `pool` do not run
        lean or compiling fails."""
        with self.decoder_unit.use() as decoder:
            if self._lean_architecture(decoder, pool) is None:
                return False
            if self._compiled_decode is None or not self._compiled_decode.serves(decoder):
                self._compiled_decode = CompiledDecode(decoder)
        # a step whose compiling fails turns compiled steps off (_lean_decode)
        warm(lambda tables, lengths, tokens: self.decode_paged(pool, tables, lengths, tokens),
             token=0)
        return self._compiled_decode is not None

    def _lean_architecture(self, decoder: nn.Module, pool: KVPool) -> Architecture | None:
        """Where this pass can skip transformers' per-layer plumbing (lean_forward.py)."""
        if not pool.on_host:
            return None
        if self._host_decoders is None:
            self._host_decoders = HostDecoders()
        return self._host_decoders.architecture_for(decoder)

    def _flex_decode(self, decoder: nn.Module, pool: KVPool, tables: list[list[int]],
                     lengths: list[int], tokens: list[int], offsets: list[int] | None
                     ) -> torch.Tensor:
        step = FlexPagedStep.decode(pool, tables, lengths, self.dtype, offsets)
        table = decoder.get_input_embeddings()
        embeds = table(torch.tensor(tokens, dtype=torch.long, device=table.weight.device))
        with flex_decode_attention(self._decoder_layers(decoder)):
            out = decoder(inputs_embeds=embeds[:, None],
                          position_ids=step.positions.to(embeds.device), cache=step,
                          paged_step=step, use_cache=False, logits_to_keep=1)
        return out.logits[:, -1]

    def read_kv_by(self, attention: str) -> None:
        """Decode steps read the pool by `attention`: "gather" or "flex" (flex_decode.py);
        call before `capture_decode_steps` (flex steps are not captured)."""
        if attention not in PAGED_ATTENTION:
            raise ValueError(f"paged attention {attention!r}: one of {PAGED_ATTENTION}")
        self.paged_attention = attention

    def capture_ahead(self, pool: KVPool) -> int:
        """Capture the decode graphs every batch size needs at the first context bucket
        now; the graphs captured (0 where steps are eager)."""
        if self.decode_graphs is None:
            return 0
        with self.decoder_unit.use() as decoder, torch.inference_mode():
            try:
                return self.decode_graphs.capture_ahead(
                    pool, decoder.get_input_embeddings(),
                    lambda step, embeds: self._run_decoder(decoder, step, embeds), self.dtype)
            except CaptureFailed as error:
                log.warning("decode_graphs_off", error=str(error))
                self.decode_graphs = None
                return 0

    def capture_decode_steps(self, pool: KVPool, max_rows: int) -> bool:
        """Replay decode steps of up to `max_rows` sequences as CUDA graphs from now on
        (model/paged/decode_graphs.py); False, and eager steps, where `max_rows` is 0 or the
        pool is not on one CUDA device."""
        self.decode_graphs = DecodeGraphs(pool.layer_devices[0], max_rows) if (
            max_rows > 0 and DecodeGraphs.usable(pool)
            and self.paged_attention == "gather") else None
        return self.decode_graphs is not None

    @staticmethod
    def _run_decoder(decoder: nn.Module, step: PagedStep, embeds: torch.Tensor) -> torch.Tensor:
        device = embeds.device
        out = decoder(inputs_embeds=embeds, position_ids=step.positions.to(device),
                      attention_mask=step.mask.to(device), cache=step, use_cache=False,
                      logits_to_keep=1)
        return out.logits[:, -1]
