"""A native GLM-4.1V checkpoint directory on disk: how it is recognised and described.

    checkpoint/
      config.json               architectures: ["Glm4vForConditionalGeneration"]
      *.safetensors             the vision tower's tensors under `model.visual.`
      autoglm_provenance.json   optional: {"name": str, "trained": bool, "note": str}
"""

from __future__ import annotations

import json
from pathlib import Path

from inference_svc.model.checkpoints.bundle import Manifest, ModuleEntry

ARCHITECTURE = "Glm4vForConditionalGeneration"
PROVENANCE = "autoglm_provenance.json"
VISION_PREFIXES = ("model.visual.", "visual.")  # transformers 5 layout, then the older one


def is_glm4v_checkpoint(directory: Path) -> bool:
    try:
        config = json.loads((directory / "config.json").read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return False
    return ARCHITECTURE in (config.get("architectures") or [])


def glm4v_manifest(directory: Path) -> Manifest:
    """The checkpoint as two modules, decoder and vision tower, in one directory; its
    provenance file (when present) names it and says whether its weights are trained."""
    provenance_file = directory / PROVENANCE
    provenance = json.loads(provenance_file.read_text()) if provenance_file.is_file() else {}
    trained = bool(provenance.get("trained", True))
    note = provenance.get("note", f"native {ARCHITECTURE} checkpoint")
    entry = ModuleEntry(".", trained, note)
    return Manifest(
        name=provenance.get("name", directory.name),
        modules={"decoder": entry, "vision": entry},
        details={"format": "glm4v", "architecture": ARCHITECTURE},
    )
