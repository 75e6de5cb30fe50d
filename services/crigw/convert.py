"""CRI protobuf messages <-> plain dicts for the msgpack wire and state files.

json_format.MessageToDict would turn int64 fields into strings; these keep
integers as integers, enums as their numbers, and use the proto field names.
Only fields that are set appear (proto3 defaults are implied).
"""

from __future__ import annotations

import base64
from typing import Any, TypeVar

from google.protobuf import json_format
from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import Message

M = TypeVar("M", bound=Message)


def _value(field: FieldDescriptor, value: Any) -> Any:
    if field.type == FieldDescriptor.TYPE_MESSAGE:
        return message_to_dict(value)
    return value


def message_to_dict(message: Message) -> dict[str, Any]:
    result: dict[str, Any] = {}
    for field, value in message.ListFields():
        if field.message_type is not None and field.message_type.GetOptions().map_entry:
            value_field = field.message_type.fields_by_name["value"]
            result[field.name] = {key: _value(value_field, item) for key, item in value.items()}
        elif field.is_repeated:
            result[field.name] = [_value(field, item) for item in value]
        else:
            result[field.name] = _value(field, value)
    return result


def dict_to_message(data: dict[str, Any], message_class: type[M]) -> M:
    """Build a message from a dict; keys the message does not know are ignored,
    so a daemon may return more than the CRI type carries."""
    return json_format.ParseDict(_jsonable(data), message_class(), ignore_unknown_fields=True)


def _jsonable(value: Any) -> Any:
    # ParseDict wants base64 text for bytes fields.
    if isinstance(value, bytes):
        return base64.b64encode(value).decode()
    if isinstance(value, dict):
        return {key: _jsonable(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_jsonable(item) for item in value]
    return value
