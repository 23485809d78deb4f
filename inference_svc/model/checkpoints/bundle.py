"""The modular bundle on disk: a manifest plus one checkpoint directory per module.

    bundle/
      manifest.json        name, format, per-module paths and provenance
      decoder/             a transformers causal-LM checkpoint and its tokenizer
      vision/              a ViTModel checkpoint + projector.safetensors
      audio/               a Wav2Vec2ConformerModel checkpoint + projector.safetensors
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

MANIFEST = "manifest.json"
FORMAT = "autoglm-modular/1"


@dataclass(frozen=True)
class ModuleEntry:
    path: str
    trained: bool
    note: str


@dataclass(frozen=True)
class Manifest:
    name: str
    modules: dict[str, ModuleEntry]
    format: str = FORMAT
    details: dict[str, str] = field(default_factory=dict)

    def write(self, directory: Path) -> None:
        (directory / MANIFEST).write_text(json.dumps(asdict(self), indent=2, ensure_ascii=False))

    @classmethod
    def read(cls, directory: Path) -> Manifest:
        path = directory / MANIFEST
        try:
            raw = json.loads(path.read_text())
        except FileNotFoundError as exc:
            raise FileNotFoundError(f"{directory} is not a modular bundle (no {MANIFEST})") from exc
        if raw.get("format") != FORMAT:
            raise ValueError(f"{path}: format {raw.get('format')!r}, expected {FORMAT!r}")
        modules = {name: ModuleEntry(**entry) for name, entry in raw["modules"].items()}
        if "decoder" not in modules:
            raise ValueError(f"{path}: a bundle needs a 'decoder' module")
        return cls(name=raw["name"], modules=modules, details=raw.get("details", {}))


def is_bundle(directory: Path) -> bool:
    return (directory / MANIFEST).is_file()
