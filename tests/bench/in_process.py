"""The baseline: the same decoder driven in-process with transformers' generate()."""

from __future__ import annotations

import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
from transformers.generation.streamers import BaseStreamer

from tests.bench.harness import Sampling, StreamResult


class StepTimes(BaseStreamer):
    """Records when generate() hands over each step's tokens (the first put is the prompt)."""

    def __init__(self) -> None:
        self.times: list[float] = []
        self._prompt_seen = False

    def put(self, value: torch.Tensor) -> None:
        if not self._prompt_seen:
            self._prompt_seen = True
            return
        self.times.append(time.perf_counter())

    def end(self) -> None:
        pass


class InProcessDecoder:
    def __init__(self, decoder_dir: Path) -> None:
        self.tokenizer = AutoTokenizer.from_pretrained(decoder_dir, padding_side="left")
        self.model = AutoModelForCausalLM.from_pretrained(decoder_dir, dtype=torch.float32).eval()
        self.eos_ids = set(_as_list(self.model.generation_config.eos_token_id))

    def generate(self, conversations: list[list[dict[str, str]]],
                 sampling: Sampling) -> list[StreamResult]:
        """One batched generate() (left padding) over the conversations, timed from the
        chat template on, like a server's request; every row shares the batch's TTFT."""
        started = time.perf_counter()
        # the service's own prompt path: template to text, then encode without extra specials
        texts = [self.tokenizer.apply_chat_template(c, tokenize=False, add_generation_prompt=True)
                 for c in conversations]
        batch = self.tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
        timer = StepTimes()
        with torch.inference_mode():
            output = self.model.generate(**batch, **sampling.generate_kwargs(), streamer=timer,
                                         pad_token_id=self.tokenizer.pad_token_id)
        ended = time.perf_counter()
        generated = output[:, batch["input_ids"].shape[1]:]
        return [
            StreamResult(
                ttft_s=(timer.times[0] if timer.times else ended) - started,
                total_s=ended - started,
                completion_tokens=self._length(row.tolist()),
                prompt_tokens=int(mask.sum()),
            )
            for row, mask in zip(generated, batch["attention_mask"], strict=True)
        ]

    def _length(self, tokens: list[int]) -> int:
        """Generated tokens up to and including the first end-of-sequence (padding after)."""
        for index, token in enumerate(tokens):
            if token in self.eos_ids:
                return index + 1
        return len(tokens)


def _as_list(value: int | list[int] | None) -> list[int]:
    if value is None:
        return []
    return [value] if isinstance(value, int) else list(value)
