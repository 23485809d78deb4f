"""The generated package matches protos/, and the protos follow buf's style rules.

The lint reads the descriptor set that protos/generate.py writes (with source info),
so it checks exactly what clients and reflection see.
"""

from __future__ import annotations

import importlib.util
import re
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest
from google.protobuf import descriptor_pb2

import autoglm

REPO = Path(__file__).resolve().parents[2]
OUR_PACKAGE = re.compile(r"^autoglm\.[a-z0-9_]+\.v[0-9]+$")

# FileDescriptorProto / DescriptorProto / ... field numbers used in SourceCodeInfo paths.
FILE_MESSAGE, FILE_ENUM, FILE_SERVICE = 4, 5, 6
MESSAGE_FIELD, MESSAGE_NESTED, MESSAGE_ENUM, MESSAGE_ONEOF = 2, 3, 4, 8
ENUM_VALUE = 2
SERVICE_METHOD = 2
RESPONSE_NAME_EXCEPTION = "buf:lint:ignore RPC_RESPONSE_STANDARD_NAME"


def load_generate_module() -> ModuleType:
    path = REPO / "protos" / "generate.py"
    spec = importlib.util.spec_from_file_location("protos_generate", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def regenerated(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("regenerated")
    load_generate_module().generate(out)
    return out / "autoglm"


@pytest.fixture(scope="module")
def our_files(regenerated) -> list[descriptor_pb2.FileDescriptorProto]:
    descriptor_set = descriptor_pb2.FileDescriptorSet.FromString(
        (regenerated / "descriptor_set.binpb").read_bytes()
    )
    files = [f for f in descriptor_set.file if OUR_PACKAGE.match(f.package)]
    assert {f.package for f in files} >= {"autoglm.inference.v1", "autoglm.control.v1",
                                          "autoglm.common.v1"}
    return files


def generated_files(root: Path) -> dict[str, bytes]:
    return {
        str(path.relative_to(root)): path.read_bytes()
        for path in sorted(root.rglob("*"))
        if path.is_file() and "__pycache__" not in path.parts
    }


def test_installed_package_is_what_protos_generate(regenerated):
    installed = generated_files(Path(autoglm.__file__).parent)
    fresh = generated_files(regenerated)
    assert sorted(installed) == sorted(fresh), "generated file list differs: rebuild"
    stale = [name for name in fresh if installed[name] != fresh[name]]
    assert not stale, f"installed autoglm/ is stale relative to protos/ (pip install -e .): {stale}"


def test_each_api_tier_is_the_common_tier_name_for_name_number_for_number():
    from autoglm.common.v1 import tier_pb2
    from autoglm.control.v1 import control_service_pb2
    from autoglm.inference.v1 import inference_service_pb2

    common = {value.name: value.number for value in tier_pb2.Tier.DESCRIPTOR.values}
    assert common == {"TIER_UNSPECIFIED": 0, "TIER_GPU": 1, "TIER_CPU": 2, "TIER_DISK": 3}
    for alias in (control_service_pb2.Tier, inference_service_pb2.Tier):
        assert {value.name: value.number for value in alias.DESCRIPTOR.values} == common
        assert alias.DESCRIPTOR.GetOptions().deprecated


def upper_snake(name: str) -> str:
    return re.sub(r"(?<=[a-z0-9])(?=[A-Z])", "_", name).upper()


def all_enums(
    file: descriptor_pb2.FileDescriptorProto,
) -> Iterator[descriptor_pb2.EnumDescriptorProto]:
    yield from file.enum_type
    pending = list(file.message_type)
    while pending:
        message = pending.pop()
        yield from message.enum_type
        pending.extend(message.nested_type)


def enum_problems(files: list[descriptor_pb2.FileDescriptorProto]) -> list[str]:
    problems = []
    for file in files:
        for enum in all_enums(file):
            prefix = upper_snake(enum.name) + "_"
            zero = next(v.name for v in enum.value if v.number == 0)
            if zero != prefix + "UNSPECIFIED":
                problems.append(f"{enum.name}: zero value {zero}, expected {prefix}UNSPECIFIED")
            problems += [
                f"{enum.name}.{v.name} lacks the prefix {prefix}"
                for v in enum.value if not v.name.startswith(prefix)
            ]
    return problems


def naming_problems(files: list[descriptor_pb2.FileDescriptorProto]) -> list[str]:
    """Each RPC takes XRequest and returns XResponse; a response of another name passes
    only where the RPC's comment says so to buf too (GenerateLive replies with Generate's
    messages)."""
    problems = []
    for file in files:
        comments = {tuple(location.path): location.leading_comments
                    for location in file.source_code_info.location}
        for i, service in enumerate(file.service):
            if not service.name.endswith("Service"):
                problems.append(f"service {service.name} does not end in Service")
            for j, rpc in enumerate(service.method):
                request = rpc.input_type.rsplit(".", 1)[-1]
                response = rpc.output_type.rsplit(".", 1)[-1]
                comment = comments.get((FILE_SERVICE, i, SERVICE_METHOD, j), "")
                if RESPONSE_NAME_EXCEPTION in comment:
                    response = f"{rpc.name}Response"
                if (request, response) != (f"{rpc.name}Request", f"{rpc.name}Response"):
                    problems.append(f"{service.name}.{rpc.name}({request}) -> "
                                    f"{rpc.output_type.rsplit('.', 1)[-1]}")
    return problems


def documented_paths(
    file: descriptor_pb2.FileDescriptorProto,
) -> Iterator[tuple[tuple[int, ...], str]]:
    """Every element a client reads, with its SourceCodeInfo path and a readable name."""

    def message_paths(message, path, name):
        yield path, name
        for i, field in enumerate(message.field):
            yield (*path, MESSAGE_FIELD, i), f"{name}.{field.name}"
        # proto3 `optional` fields get a synthetic oneof that has no source of its own
        synthetic = {f.oneof_index for f in message.field if f.proto3_optional}
        for i, oneof in enumerate(message.oneof_decl):
            if i not in synthetic:
                yield (*path, MESSAGE_ONEOF, i), f"{name}.{oneof.name}"
        for i, enum in enumerate(message.enum_type):
            yield from enum_paths(enum, (*path, MESSAGE_ENUM, i), f"{name}.{enum.name}")
        for i, nested in enumerate(message.nested_type):
            if not nested.options.map_entry:
                yield from message_paths(nested, (*path, MESSAGE_NESTED, i),
                                         f"{name}.{nested.name}")

    def enum_paths(enum, path, name):
        yield path, name
        for i, value in enumerate(enum.value):
            yield (*path, ENUM_VALUE, i), f"{name}.{value.name}"

    for i, message in enumerate(file.message_type):
        yield from message_paths(message, (FILE_MESSAGE, i), message.name)
    for i, enum in enumerate(file.enum_type):
        yield from enum_paths(enum, (FILE_ENUM, i), enum.name)
    for i, service in enumerate(file.service):
        yield (FILE_SERVICE, i), service.name
        for j, rpc in enumerate(service.method):
            yield (FILE_SERVICE, i, SERVICE_METHOD, j), f"{service.name}.{rpc.name}"


def comment_problems(files: list[descriptor_pb2.FileDescriptorProto]) -> list[str]:
    undocumented = []
    for file in files:
        assert file.source_code_info.location, f"{file.name}: descriptor set lacks source info"
        comments = {
            tuple(location.path): location.leading_comments.strip()
            for location in file.source_code_info.location
        }
        undocumented += [
            f"{file.package}.{name}" for path, name in documented_paths(file)
            if not comments.get(path)
        ]
    return [f"no leading comment: {name}" for name in undocumented]


def layout_problems(files: list[descriptor_pb2.FileDescriptorProto]) -> list[str]:
    problems = []
    for file in files:
        directory, _, basename = file.name.rpartition("/")
        if directory != file.package.replace(".", "/"):
            problems.append(f"{file.name}: package {file.package} in directory {directory}/")
        if not re.fullmatch(r"[a-z0-9_]+\.proto", basename):
            problems.append(f"{file.name}: file name is not lower_snake_case")
    return problems


LINT_RULES = [enum_problems, naming_problems, comment_problems, layout_problems]


@pytest.mark.parametrize("rule", LINT_RULES, ids=lambda rule: rule.__name__)
def test_our_protos_pass_the_lint(our_files, rule):
    assert rule(our_files) == []


# One violation per rule, in a file whose directory does not match its package.
BAD_PROTO = """syntax = "proto3";
// A package in the wrong directory.
package autoglm.bad.v1;
// Zero value without the UNSPECIFIED suffix.
enum Color {
  // Zero.
  COLOR_RED = 0;
}
// Ping.
message PingRequest {
  int32 undocumented_field = 1;
}
// Not named after the RPC.
message Pong {}
// Named without the Service suffix.
service Pinger {
  // Ping.
  rpc Ping(PingRequest) returns (Pong);
}
"""


@pytest.fixture(scope="module")
def bad_files(tmp_path_factory) -> list[descriptor_pb2.FileDescriptorProto]:
    from grpc_tools import protoc

    root = tmp_path_factory.mktemp("bad")
    (root / "wrong").mkdir()
    (root / "wrong" / "Bad.proto").write_text(BAD_PROTO)
    out = root / "set.binpb"
    assert protoc.main(["protoc", f"-I{root}", f"--descriptor_set_out={out}",
                        "--include_source_info", "wrong/Bad.proto"]) == 0
    return list(descriptor_pb2.FileDescriptorSet.FromString(out.read_bytes()).file)


@pytest.mark.parametrize(("rule", "expected"), [
    (enum_problems, "Color: zero value COLOR_RED, expected COLOR_UNSPECIFIED"),
    (naming_problems, "service Pinger does not end in Service"),
    (naming_problems, "Pinger.Ping(PingRequest) -> Pong"),
    (comment_problems, "no leading comment: autoglm.bad.v1.PingRequest.undocumented_field"),
    (layout_problems, "wrong/Bad.proto: package autoglm.bad.v1 in directory wrong/"),
    (layout_problems, "wrong/Bad.proto: file name is not lower_snake_case"),
], ids=lambda value: value.__name__ if callable(value) else None)
def test_the_lint_reports_violations(bad_files, rule, expected):
    assert expected in rule(bad_files)
