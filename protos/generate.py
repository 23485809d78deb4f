"""Generate the Python gRPC code for every .proto under protos/ (run by the build)."""

from __future__ import annotations

import sys
from pathlib import Path

PROTO_ROOT = Path(__file__).resolve().parent
DEFAULT_OUT = PROTO_ROOT.parent
DESCRIPTOR_SET = Path("autoglm") / "descriptor_set.binpb"


def proto_files(root: Path = PROTO_ROOT) -> list[Path]:
    return sorted(root.rglob("*.proto"))


def generate(out_dir: Path = DEFAULT_OUT) -> list[Path]:
    """Write *_pb2.py, *_pb2.pyi and *_pb2_grpc.py for each proto into out_dir.

    The package layout follows the proto packages (autoglm/inference/v1/...), and
    every directory gets an __init__.py so it imports as a regular package.
    """
    import grpc_tools
    from grpc_tools import protoc

    include = Path(grpc_tools.__file__).resolve().parent / "_proto"
    files = proto_files()
    args = [
        "grpc_tools.protoc",
        f"-I{PROTO_ROOT}",
        f"-I{include}",
        f"--python_out={out_dir}",
        f"--pyi_out={out_dir}",
        f"--grpc_python_out={out_dir}",
        # with comments, so that reflection clients (grpcurl describe) show the docs
        f"--descriptor_set_out={out_dir / DESCRIPTOR_SET}",
        "--include_source_info",
        "--include_imports",
        *(str(f) for f in files),
    ]
    (out_dir / "autoglm").mkdir(parents=True, exist_ok=True)
    if protoc.main(args) != 0:
        raise RuntimeError("protoc failed on " + ", ".join(str(f) for f in files))
    written: list[Path] = []
    for proto in files:
        package_dir = out_dir / proto.parent.relative_to(PROTO_ROOT)
        for directory in [package_dir, *package_dir.relative_to(out_dir).parents]:
            init = out_dir / directory / "__init__.py"
            if directory != Path(".") and not init.exists():
                init.write_text("")
        stem = proto.stem
        written += [package_dir / f"{stem}_pb2.py", package_dir / f"{stem}_pb2_grpc.py"]
    return written


if __name__ == "__main__":
    out = Path(sys.argv[1]) if len(sys.argv) > 1 else DEFAULT_OUT
    for path in generate(out):
        print(path)
