"""A prompt whose last user message ends with speech still arriving (GenerateLive): its
plan grows as the audio's chunks come, and is complete once the audio is sealed."""

from __future__ import annotations

from dataclasses import dataclass

from inference_svc.model.inputs.live_audio import LiveAudio
from inference_svc.model.inputs.prompt import PromptPlan, live_plan


@dataclass(eq=False)
class LivePrompt:
    base: PromptPlan  # rendered with the live audio 0 tokens long
    audio: LiveAudio
    placeholder_id: int
    context: int  # the model's context length: the reply gets what the prompt leaves

    def plan(self) -> PromptPlan:
        """The prompt as far as it can be prefilled now."""
        tokens, sealed = self.audio.ready()
        return live_plan(self.base, tokens, self.audio.digest, self.placeholder_id,
                         open=not sealed)
