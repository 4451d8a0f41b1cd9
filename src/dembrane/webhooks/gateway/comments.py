"""The comments of the API's protos, for the OpenAPI document's descriptions.

The generated Python code carries no comments, so ``make generate`` also writes the protos'
descriptors with their source information (``v1/api_descriptors.binpb``, committed and
checked like the code). Every service, RPC, message, field and enum value has a comment in
full sentences; this module maps each element's full name to its leading comment.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator, Mapping, Sequence
from importlib import resources

from google.protobuf import descriptor_pb2

__all__ = ["api_comments"]

_PACKAGE = "dembrane.webhooks.v1"
_FILE = "api_descriptors.binpb"

# Field numbers of descriptor.proto, which make up a source location's path.
_FILE_MESSAGES, _FILE_ENUMS, _FILE_SERVICES = 4, 5, 6
_MESSAGE_FIELDS, _MESSAGE_NESTED, _MESSAGE_ENUMS = 2, 3, 4
_ENUM_VALUES = 2
_SERVICE_METHODS = 2

Path = tuple[int, ...]


@functools.cache
def api_comments() -> Mapping[str, str]:
    """Each commented element's full name (``dembrane.webhooks.v1.Delivery.attempts``) with
    its leading comment as one line; empty when the descriptor set is missing."""
    try:
        data = resources.files(_PACKAGE).joinpath(_FILE).read_bytes()
    except (FileNotFoundError, ModuleNotFoundError):
        return {}
    comments: dict[str, str] = {}
    for file in descriptor_pb2.FileDescriptorSet.FromString(data).file:
        names = dict(_element_names(file))
        for location in file.source_code_info.location:
            name = names.get(tuple(location.path))
            text = " ".join(location.leading_comments.split())
            if name is not None and text:
                comments[name] = text
    return comments


def _element_names(file: descriptor_pb2.FileDescriptorProto) -> Iterator[tuple[Path, str]]:
    prefix = file.package
    for index, message in enumerate(file.message_type):
        yield from _message_names(message, (_FILE_MESSAGES, index), prefix)
    for index, enum in enumerate(file.enum_type):
        yield from _enum_names(enum, (_FILE_ENUMS, index), prefix)
    for index, service in enumerate(file.service):
        name = f"{prefix}.{service.name}"
        yield (_FILE_SERVICES, index), name
        for number, method in enumerate(service.method):
            yield (_FILE_SERVICES, index, _SERVICE_METHODS, number), f"{name}.{method.name}"


def _message_names(
    message: descriptor_pb2.DescriptorProto, path: Path, prefix: str
) -> Iterator[tuple[Path, str]]:
    name = f"{prefix}.{message.name}"
    yield path, name
    yield from _children(path, _MESSAGE_FIELDS, name, [f.name for f in message.field])
    for index, nested in enumerate(message.nested_type):
        yield from _message_names(nested, (*path, _MESSAGE_NESTED, index), name)
    for index, enum in enumerate(message.enum_type):
        yield from _enum_names(enum, (*path, _MESSAGE_ENUMS, index), name)


def _enum_names(
    enum: descriptor_pb2.EnumDescriptorProto, path: Path, prefix: str
) -> Iterator[tuple[Path, str]]:
    # Enum values are named in their enum's scope, as protobuf names them.
    yield path, f"{prefix}.{enum.name}"
    yield from _children(path, _ENUM_VALUES, prefix, [v.name for v in enum.value])


def _children(
    path: Path, kind: int, prefix: str, names: Sequence[str]
) -> Iterator[tuple[Path, str]]:
    for index, name in enumerate(names):
        yield (*path, kind, index), f"{prefix}.{name}"
