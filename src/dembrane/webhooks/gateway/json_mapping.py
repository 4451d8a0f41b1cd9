"""Protobuf messages to the REST JSON of the contract, and request JSON back to messages.

The REST shapes are those the integrations tab already reads, which differ from the
canonical proto3 JSON mapping in a few systematic ways, all decided here once:

* field names stay snake_case, but timestamps and durations get the names of the old API
  (``create_time`` is ``date_created``, ``latency`` is ``latency_ms``, ...);
* enums are the value name without the enum's prefix, lowercased
  (``WEBHOOK_STATUS_PUBLISHED`` is ``published``);
* timestamps are ISO 8601 in UTC with a ``Z`` and microseconds;
* a field with presence that is not set (a message, a proto3 ``optional``) is ``null``;
  every other field is always present, with its default when unset.

The OpenAPI document is generated from the same :class:`RestField` views, so the document
and the JSON on the wire cannot disagree. A field type the mapping does not know stops the
import, rather than reaching the wire in some accidental shape.
"""

from __future__ import annotations

import enum
import functools
import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from google.protobuf import json_format
from google.protobuf.descriptor import Descriptor, EnumDescriptor, FieldDescriptor
from google.protobuf.duration_pb2 import Duration
from google.protobuf.message import Message
from google.protobuf.timestamp_pb2 import Timestamp

from dembrane.webhooks.domain.webhooks import SETTABLE_STATUSES, WebhookStatus
from dembrane.webhooks.gateway.errors import RestError
from dembrane.webhooks.v1 import webhook_pb2

__all__ = [
    "FieldKind",
    "RestField",
    "enum_values",
    "format_timestamp",
    "message_to_json",
    "parse_body",
    "rest_field_path",
    "rest_fields",
    "set_from_json",
    "set_from_query",
    "set_path_parameter",
]

# The names of the old REST API for fields whose proto name follows AIP style.
_JSON_NAMES: dict[str, str] = {
    "create_time": "date_created",
    "update_time": "date_updated",
    "previous_secret_expire_time": "previous_secret_expires_at",
    "next_attempt_time": "next_attempt_at",
    "last_attempt_time": "last_attempt_at",
    "attempt_time": "attempted_at",
    "latency": "latency_ms",
    "grace_period": "grace_period_seconds",
}

_INT32_RANGE = (-(2**31), 2**31 - 1)
# google.protobuf.Duration holds at most about 10,000 years, in either direction.
_MAX_DURATION_SECONDS = 315_576_000_000


class FieldKind(enum.Enum):
    """How one field looks in REST JSON."""

    STRING = "string"
    INTEGER = "integer"
    BOOLEAN = "boolean"
    NUMBER = "number"
    ENUM = "enum"
    TIMESTAMP = "timestamp"
    DURATION_MS = "duration_ms"
    DURATION_SECONDS = "duration_seconds"
    OBJECT = "object"
    MESSAGE = "message"
    FIELD_MASK = "field_mask"


@dataclass(frozen=True)
class RestField:
    """One proto field as the REST API shows it."""

    #: The key in REST JSON.
    name: str
    #: The proto field behind it.
    descriptor: FieldDescriptor
    kind: FieldKind
    repeated: bool
    #: Whether the key is ``null`` when the field is not set (fields with presence).
    nullable: bool

    @property
    def proto_name(self) -> str:
        """The proto field's name."""
        return self.descriptor.name

    @property
    def enum_type(self) -> EnumDescriptor:
        """The enum type of an enum field."""
        if self.descriptor.enum_type is None:
            raise TypeError(f"{self.descriptor.full_name} is not an enum field.")
        return self.descriptor.enum_type

    @property
    def message_type(self) -> Descriptor:
        """The message type of a message field."""
        if self.descriptor.message_type is None:
            raise TypeError(f"{self.descriptor.full_name} is not a message field.")
        return self.descriptor.message_type


_SCALAR_KINDS: dict[int, FieldKind] = {
    FieldDescriptor.TYPE_STRING: FieldKind.STRING,
    FieldDescriptor.TYPE_BOOL: FieldKind.BOOLEAN,
    FieldDescriptor.TYPE_INT32: FieldKind.INTEGER,
    FieldDescriptor.TYPE_SINT32: FieldKind.INTEGER,
    FieldDescriptor.TYPE_UINT32: FieldKind.INTEGER,
    FieldDescriptor.TYPE_DOUBLE: FieldKind.NUMBER,
    FieldDescriptor.TYPE_FLOAT: FieldKind.NUMBER,
    FieldDescriptor.TYPE_ENUM: FieldKind.ENUM,
}


@functools.cache
def rest_fields(descriptor: Descriptor) -> tuple[RestField, ...]:
    """The REST view of a message type's fields, in declaration order."""
    return tuple(_rest_field(field) for field in descriptor.fields)


def rest_field_path(descriptor: Descriptor, path: str) -> str:
    """A field path of ``descriptor`` in proto names, as the REST API names it.

    ``grace_period`` is ``grace_period_seconds``; the segments of a dotted path are renamed
    through the nested messages, and from a segment the message lacks on, the path is kept.
    """
    head, dot, rest = path.partition(".")
    field = next((f for f in rest_fields(descriptor) if f.proto_name == head), None)
    if field is None:
        return path
    if dot and field.kind is FieldKind.MESSAGE:
        return f"{field.name}.{rest_field_path(field.message_type, rest)}"
    return field.name + dot + rest


def _rest_field(field: FieldDescriptor) -> RestField:
    name = _JSON_NAMES.get(field.name, field.name)
    kind = _SCALAR_KINDS.get(field.type)
    if kind is None and field.type == FieldDescriptor.TYPE_MESSAGE:
        kind = _message_kind(field, name)
    if kind is None:
        raise TypeError(f"The REST gateway has no JSON mapping for field {field.full_name}.")
    return RestField(
        name=name,
        descriptor=field,
        kind=kind,
        repeated=field.is_repeated,
        nullable=field.has_presence and not field.is_repeated,
    )


def _message_kind(field: FieldDescriptor, name: str) -> FieldKind:
    message_type = field.message_type
    if message_type is None:
        raise TypeError(f"Field {field.full_name} has no message type.")
    full_name = message_type.full_name
    if full_name == "google.protobuf.Timestamp":
        return FieldKind.TIMESTAMP
    if full_name == "google.protobuf.Duration":
        # The unit is in the REST name, so a new Duration field must get a name here first.
        if name.endswith("_ms"):
            return FieldKind.DURATION_MS
        if name.endswith("_seconds"):
            return FieldKind.DURATION_SECONDS
        raise TypeError(f"Duration field {field.full_name} needs a REST name with its unit.")
    if full_name == "google.protobuf.Struct":
        return FieldKind.OBJECT
    if full_name == "google.protobuf.FieldMask":
        return FieldKind.FIELD_MASK
    if full_name.startswith("google.protobuf."):
        raise TypeError(f"The REST gateway has no JSON mapping for field {field.full_name}.")
    rest_fields(message_type)  # fail at import for unmappable nested fields too
    return FieldKind.MESSAGE


def _enum_prefix(descriptor: EnumDescriptor) -> str:
    """``WebhookStatus`` -> ``WEBHOOK_STATUS_``, the prefix Buf's lint rules require."""
    return re.sub(r"(?<!^)(?=[A-Z])", "_", descriptor.name).upper() + "_"


@functools.cache
def enum_values(descriptor: EnumDescriptor) -> dict[str, int]:
    """REST names of an enum's values, without the ``_UNSPECIFIED`` zero value."""
    prefix = _enum_prefix(descriptor)
    return {
        value.name.removeprefix(prefix).lower(): value.number
        for value in descriptor.values
        if value.number != 0
    }


def settable_enum_values(descriptor: EnumDescriptor) -> list[str]:
    """The REST names a request may offer: a webhook's ``disabled`` is the service's to set
    (offered, it is refused with that reason), so it is left out of what requests list."""
    values = list(enum_values(descriptor))
    if descriptor is webhook_pb2.WebhookStatus.DESCRIPTOR:
        values = [v for v in values if WebhookStatus(v) in SETTABLE_STATUSES]
    return values


def _enum_name(descriptor: EnumDescriptor, number: int) -> str:
    for name, value in enum_values(descriptor).items():
        if value == number:
            return name
    return "unspecified"


def format_timestamp(moment: datetime) -> str:
    """ISO 8601 in UTC, always with microseconds and a ``Z``."""
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


# --- messages to JSON ------------------------------------------------------------------


def message_to_json(message: Message) -> dict[str, Any]:
    """A message as REST JSON."""
    body: dict[str, Any] = {}
    for field in rest_fields(message.DESCRIPTOR):
        if field.kind is FieldKind.FIELD_MASK:
            continue
        value = getattr(message, field.proto_name)
        if field.repeated:
            body[field.name] = [_value_to_json(field, item) for item in value]
        elif field.nullable and not message.HasField(field.proto_name):
            body[field.name] = None
        else:
            body[field.name] = _value_to_json(field, value)
    return body


def _value_to_json(field: RestField, value: Any) -> Any:
    match field.kind:
        case FieldKind.ENUM:
            return _enum_name(field.enum_type, value)
        case FieldKind.TIMESTAMP:
            return format_timestamp(value.ToDatetime(tzinfo=UTC))
        case FieldKind.DURATION_MS:
            return round(value.ToNanoseconds() / 1_000_000)
        case FieldKind.DURATION_SECONDS:
            seconds = value.ToNanoseconds() / 1_000_000_000
            return int(seconds) if seconds.is_integer() else seconds
        case FieldKind.OBJECT:
            return json_format.MessageToDict(value)
        case FieldKind.MESSAGE:
            return message_to_json(value)
        case _:
            return value


# --- JSON and query strings to messages ------------------------------------------------


def parse_body(raw: bytes) -> dict[str, Any]:
    """A request body as a JSON object; an empty body is an empty object.

    Raises :class:`RestError` 422 for anything that is not a JSON object.
    """
    if not raw.strip():
        return {}
    try:
        body = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise RestError(422, "The request body is not valid JSON.") from None
    if not isinstance(body, dict):
        raise RestError(422, "The request body must be a JSON object.")
    return body


def set_path_parameter(message: Message, name: str, value: str) -> None:
    """Copy a path parameter into the request's string field of the same name."""
    setattr(message, name, _text(f"The {name} in the path", value))


def set_from_json(message: Message, body: Mapping[str, Any], *, skip: frozenset[str]) -> list[str]:
    """Fill ``message`` from a JSON object and return the REST names that were set.

    Keys the message does not know are ignored, and so is ``null``: it means "not given".
    Wrong JSON types raise :class:`RestError` 422; well-typed but impossible values (an
    unknown status name) raise 400 naming the field, as the server does for the fields it
    checks.
    """
    given: list[str] = []
    for field in rest_fields(message.DESCRIPTOR):
        if field.name in skip or field.kind is FieldKind.FIELD_MASK:
            continue
        if field.proto_name != field.name and body.get(field.proto_name) is not None:
            # The gRPC name of a field the REST API names otherwise (grace_period for
            # grace_period_seconds): ignoring it would quietly do something else.
            raise RestError(422, f"Unknown field {field.proto_name}; did you mean {field.name}?")
        value = body.get(field.name)
        if value is None:
            continue
        if field.repeated:
            if not isinstance(value, list):
                raise RestError(422, f"The {field.name} field must be a list.")
            each = f"Every item of the {field.name} field"
            items = [_json_to_value(field, item, each) for item in value]
            getattr(message, field.proto_name).extend(items)
        elif field.kind in (FieldKind.TIMESTAMP, FieldKind.DURATION_SECONDS):
            converted = _json_to_value(field, value, f"The {field.name} field")
            getattr(message, field.proto_name).CopyFrom(converted)
        else:
            converted = _json_to_value(field, value, f"The {field.name} field")
            setattr(message, field.proto_name, converted)
        given.append(field.name)
    return given


def set_from_query(message: Message, query: Mapping[str, str], *, skip: frozenset[str]) -> None:
    """Fill the scalar fields of ``message`` from query parameters of the same REST names."""
    for field in rest_fields(message.DESCRIPTOR):
        if field.name in skip or field.repeated or field.name not in query:
            continue
        raw = query[field.name]
        label = f"The {field.name} parameter"
        value: Any
        match field.kind:
            case FieldKind.STRING:
                value = _text(label, raw)
            case FieldKind.INTEGER:
                text = raw.strip()
                if not re.fullmatch(r"-?[0-9]+", text):
                    raise RestError(422, f"{label} must be an integer.")
                # Past ten digits (leading zeros aside) no int32 is left, so a number of any
                # length is out of range without int() having to read all of it.
                big = len(text.lstrip("-").lstrip("0")) > 10
                beyond = _INT32_RANGE[0] - 1 if text.startswith("-") else _INT32_RANGE[1] + 1
                value = _int32(field.name, label, beyond if big else int(text))
            case FieldKind.BOOLEAN:
                if raw.lower() not in ("true", "false"):
                    raise RestError(422, f"{label} must be true or false.")
                value = raw.lower() == "true"
            case FieldKind.ENUM:
                if raw == "":
                    continue  # an empty filter means "any", like the unspecified value
                value = _enum_number(field, raw, label)
            case FieldKind.TIMESTAMP:
                getattr(message, field.proto_name).CopyFrom(_timestamp(field.name, label, raw))
                continue
            case _:
                continue  # only scalars travel in query strings
        setattr(message, field.proto_name, value)


def _json_to_value(field: RestField, value: Any, label: str) -> Any:
    match field.kind:
        case FieldKind.STRING:
            if not isinstance(value, str):
                raise RestError(422, f"{label} must be a string.")
            return _text(label, value)
        case FieldKind.BOOLEAN:
            if not isinstance(value, bool):
                raise RestError(422, f"{label} must be true or false.")
            return value
        case FieldKind.INTEGER:
            if isinstance(value, bool) or not isinstance(value, int):
                raise RestError(422, f"{label} must be an integer.")
            return _int32(field.name, label, value)
        case FieldKind.NUMBER:
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise RestError(422, f"{label} must be a number.")
            return float(value)
        case FieldKind.ENUM:
            if not isinstance(value, str):
                raise RestError(422, f"{label} must be a string.")
            return _enum_number(field, value, label, body=True)
        case FieldKind.TIMESTAMP:
            if not isinstance(value, str):
                raise RestError(422, f"{label} must be an ISO 8601 date-time string.")
            return _timestamp(field.name, label, value)
        case FieldKind.DURATION_SECONDS:
            return _duration_seconds(field.name, label, value)
        case _:
            # Request messages carry no other kinds today; failing loudly beats guessing.
            raise RestError(422, f"{label} cannot be set through the REST API.")


def _text(label: str, value: str) -> str:
    # Protobuf strings must be valid UTF-8; JSON escapes can smuggle in lone surrogates.
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise RestError(422, f"{label} must be valid Unicode text.") from None
    return value


def _int32(name: str, label: str, value: int) -> int:
    low, high = _INT32_RANGE
    if value > high:
        raise RestError(400, f"{label} must be at most {high}.", name)
    if value < low:
        raise RestError(400, f"{label} must be at least {low}.", name)
    return value


def _enum_number(field: RestField, value: str, label: str, *, body: bool = False) -> int:
    values = enum_values(field.enum_type)
    number = values.get(value)
    if number is None:
        choices = ", ".join(settable_enum_values(field.enum_type) if body else values)
        # "DISABLED" for "disabled": say what is wrong rather than list what looks the same.
        lower = value.lower()
        case = f" (in lower case: {lower})" if lower != value and lower in values else ""
        raise RestError(400, f"{label} must be one of {choices}{case}.", field.name)
    return number


def _timestamp(name: str, label: str, value: str) -> Timestamp:
    # RFC 3339 allows a lowercase "t" and "z"; datetime.fromisoformat does not.
    text = value.strip().upper()
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        raise RestError(422, f"{label} must be an ISO 8601 date-time string.") from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)  # the API speaks UTC; a bare time means UTC
    try:
        moment = moment.astimezone(UTC)
    except OverflowError:
        raise RestError(400, f"{label} is out of range.", name) from None
    stamp = Timestamp()
    stamp.FromDatetime(moment)
    return stamp


def _duration_seconds(name: str, label: str, value: Any) -> Duration:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise RestError(422, f"{label} must be a number of seconds.")
    if not math.isfinite(value) or abs(value) > _MAX_DURATION_SECONDS:
        raise RestError(400, f"{label} is out of range.", name)
    duration = Duration()
    duration.FromTimedelta(timedelta(seconds=value))
    return duration
