"""Server reflection that serves the proto comments too.

grpc's reflection servicer serialises descriptors with CopyToProto(), which drops
source info, so `grpcurl describe` would show no documentation. The build writes a
descriptor set with source info (protos/generate.py); this pool adapter hands those
FileDescriptorProtos out instead.
"""

from __future__ import annotations

from pathlib import Path

from google.protobuf import descriptor_pb2, descriptor_pool

import autoglm

DESCRIPTOR_SET = Path(autoglm.__file__).resolve().parent / "descriptor_set.binpb"


class _DocumentedFile:
    def __init__(self, descriptor, protos: dict[str, descriptor_pb2.FileDescriptorProto]):
        self._descriptor = descriptor
        self._protos = protos
        self.name = descriptor.name

    @property
    def dependencies(self) -> list[_DocumentedFile]:
        return [_DocumentedFile(d, self._protos) for d in self._descriptor.dependencies]

    def CopyToProto(self, proto: descriptor_pb2.FileDescriptorProto) -> None:
        documented = self._protos.get(self.name)
        if documented is not None:
            proto.CopyFrom(documented)
        else:
            self._descriptor.CopyToProto(proto)


class DocumentedPool:
    """The default descriptor pool, answering file look-ups with documented protos."""

    def __init__(self, descriptor_set: Path = DESCRIPTOR_SET) -> None:
        self._pool = descriptor_pool.Default()
        self._protos: dict[str, descriptor_pb2.FileDescriptorProto] = {}
        if descriptor_set.is_file():
            files = descriptor_pb2.FileDescriptorSet.FromString(descriptor_set.read_bytes())
            self._protos = {f.name: f for f in files.file if f.source_code_info.location}

    def FindFileByName(self, name: str) -> _DocumentedFile:
        return _DocumentedFile(self._pool.FindFileByName(name), self._protos)

    def FindFileContainingSymbol(self, symbol: str) -> _DocumentedFile:
        return _DocumentedFile(self._pool.FindFileContainingSymbol(symbol), self._protos)

    def __getattr__(self, name: str):
        return getattr(self._pool, name)
