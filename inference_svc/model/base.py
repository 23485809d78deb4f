"""What every served model shares: its units and what they say about it."""

from __future__ import annotations

from inference_svc.model.units import ModuleUnit


class UnitModel:
    """A model made of separately resident units: a decoder and per-modality encoders."""

    manifest: object
    decoder_unit: ModuleUnit
    encoders: dict[str, ModuleUnit]

    @property
    def name(self) -> str:
        return self.manifest.name

    @property
    def units(self) -> list[ModuleUnit]:
        return [self.decoder_unit, *self.encoders.values()]

    @property
    def modalities(self) -> list[str]:
        return ["text", *self.encoders]
