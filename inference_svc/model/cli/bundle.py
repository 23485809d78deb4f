"""autoglm-bundle: write a model directory the server can load, or show what one holds.

    autoglm-bundle write [--kind default] [--force] OUT
    autoglm-bundle show [--json] DIR

`write` builds the embedded default (SmolLM2-135M-Instruct with untrained encoders);
`show` reads only the safetensors headers, never the weights themselves.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import tempfile
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

from inference_svc.model.checkpoints.bundle import Manifest, ModuleEntry
from inference_svc.model.checkpoints.glm4v_checkpoint import (
    ARCHITECTURE,
    VISION_PREFIXES,
    glm4v_manifest,
)
from inference_svc.model.checkpoints.headers import safetensors_header
from inference_svc.model.checkpoints.model_dir import ModelKind, NotAModelDirectory, model_kind

PROG = "autoglm-bundle"


class BundleCliError(Exception):
    """A problem with the command's arguments or directories, reported without a traceback."""


Writer = Callable[[Path], None]


def _write_default(out: Path) -> None:
    # torch only when writing
    from inference_svc.model.checkpoints.default_bundle import write_default_bundle

    write_default_bundle(out)


WRITERS: dict[str, Writer] = {"default": _write_default}


@dataclass(frozen=True)
class ModuleSummary:
    name: str
    path: str
    trained: bool
    note: str
    tensors: int
    parameters: int
    parameter_bytes: int


@dataclass(frozen=True)
class BundleSummary:
    name: str
    kind: str
    directory: str
    modules: list[ModuleSummary]

    @property
    def untrained(self) -> list[str]:
        return [m.name for m in self.modules if not m.trained]


def tensor_table(files: list[Path]) -> dict[str, tuple[int, int]]:
    """Tensor name -> (elements, bytes) over the given safetensors files."""
    table = {}
    for path in files:
        for name, info in safetensors_header(path).items():
            start, end = info["data_offsets"]
            table[name] = (math.prod(info["shape"]), end - start)
    return table


def module_summary(
    name: str, entry: ModuleEntry, tensors: dict[str, tuple[int, int]]
) -> ModuleSummary:
    return ModuleSummary(
        name=name, path=entry.path, trained=entry.trained, note=entry.note,
        tensors=len(tensors), parameters=sum(count for count, _ in tensors.values()),
        parameter_bytes=sum(size for _, size in tensors.values()),
    )


def summarise_bundle(directory: Path) -> BundleSummary:
    manifest = Manifest.read(directory)
    modules = []
    for name, entry in manifest.modules.items():
        module_dir = directory / entry.path
        if not module_dir.is_dir():
            raise BundleCliError(f"{directory}: module {name!r} has no directory {module_dir}")
        tensors = tensor_table(sorted(module_dir.glob("*.safetensors")))
        modules.append(module_summary(name, entry, tensors))
    return BundleSummary(manifest.name, manifest.format, str(directory), modules)


def summarise_glm4v(directory: Path) -> BundleSummary:
    manifest = glm4v_manifest(directory)
    tensors = tensor_table(sorted(directory.glob("*.safetensors")))
    vision = {k: v for k, v in tensors.items() if k.startswith(VISION_PREFIXES)}
    decoder = {k: v for k, v in tensors.items() if k not in vision}
    return BundleSummary(manifest.name, ARCHITECTURE, str(directory), [
        module_summary("decoder", manifest.modules["decoder"], decoder),
        module_summary("vision", manifest.modules["vision"], vision),
    ])


def summarise(directory: Path) -> BundleSummary:
    if model_kind(directory) is ModelKind.MODULAR:
        return summarise_bundle(directory)
    return summarise_glm4v(directory)


def human_bytes(count: int) -> str:
    if count < 1024:
        return f"{count} B"
    size = count / 1024
    for unit in ("KiB", "MiB"):
        if size < 1024:
            return f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} GiB"


def render(summary: BundleSummary) -> str:
    lines = [f"{summary.name}  ({summary.kind})", f"  directory: {summary.directory}"]
    for m in summary.modules:
        state = "trained" if m.trained else "UNTRAINED"
        lines.append(
            f"  {m.name:<8} {m.path + '/':<10} {m.parameters:>12,} params  "
            f"{m.parameter_bytes:>12,} bytes ({human_bytes(m.parameter_bytes)})  "
            f"{state}: {m.note}"
        )
    total = sum(m.parameter_bytes for m in summary.modules)
    lines.append(f"  total parameter bytes: {total:,} ({human_bytes(total)})")
    untrained = summary.untrained
    lines.append(
        f"  untrained weights: {', '.join(untrained)} (outputs carry no meaning)"
        if untrained else "  untrained weights: none"
    )
    return "\n".join(lines)


def prepare_output(out: Path, force: bool) -> None:
    """Refuse to overwrite anything but a model directory, and that only with --force."""
    if not out.exists():
        return
    if not out.is_dir():
        raise BundleCliError(f"{out} exists and is not a directory")
    if not any(out.iterdir()):
        return
    if not force:
        raise BundleCliError(f"{out} exists and is not empty (use --force to replace it)")
    try:
        model_kind(out)
    except NotAModelDirectory:
        raise BundleCliError(f"refusing to replace {out}: it does not hold a bundle") from None


def write(writer: Writer, out: Path, force: bool) -> None:
    prepare_output(out, force)
    out.parent.mkdir(parents=True, exist_ok=True)
    # Build beside OUT and swap it in, so a failure never leaves a half-written bundle.
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=f".{out.name}.build-") as tmp:
        staging = Path(tmp) / out.name
        writer(staging)
        if out.exists():
            shutil.rmtree(out)
        staging.rename(out)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    write_parser = commands.add_parser("write", help="write a model directory")
    write_parser.add_argument(
        "--kind", choices=sorted(WRITERS), default="default",
        help="default: SmolLM2-135M from the embedded GGUF with untrained encoders",
    )
    write_parser.add_argument("--force", action="store_true",
                              help="replace an existing bundle at OUT")
    write_parser.add_argument("out", type=Path, metavar="OUT")
    show_parser = commands.add_parser("show", help="describe a bundle or GLM-4.1V checkpoint")
    show_parser.add_argument("--json", action="store_true", help="print JSON")
    show_parser.add_argument("directory", type=Path, metavar="DIR")
    return parser


def quiet_transformers() -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "write":
            quiet_transformers()
            write(WRITERS[args.kind], args.out, args.force)
            print(render(summarise(args.out)))
        else:
            summary = summarise(args.directory)
            if args.json:
                print(json.dumps({**asdict(summary), "untrained": summary.untrained}, indent=2))
            else:
                print(render(summary))
    except (BundleCliError, OSError, ValueError) as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
