"""JSON for the shims, straight from CPython's C accelerator (`_json`).

The `json` package imports `re` (and with it `enum`, `functools` and the
regular-expression compiler) for its pure-Python fallback. In the shim
zygote every imported module is resident memory each shim maps, so the shim
side uses the same C scanner and encoder `json` itself uses, without the
package around them. shimd and the other services use `json` as usual: the
bytes on the wire are ordinary JSON either way.
"""

from __future__ import annotations

import _json

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any


class _ScannerContext:
    """The attributes `_json.make_scanner` reads (json.JSONDecoder's defaults)."""

    strict = True
    object_hook = None
    object_pairs_hook = None
    parse_float = float
    parse_int = int
    parse_constant = None


def _unsupported(value: Any) -> Any:
    raise TypeError(f"{type(value).__name__} is not JSON serializable")


_scan_once = _json.make_scanner(_ScannerContext())
# markers=None: no cycle check, the shim only encodes trees it built.
_encode = _json.make_encoder(None, _unsupported, _json.encode_basestring_ascii, None, ": ", ", ", False, False, True)
_WHITESPACE = " \t\n\r"


def loads(data: bytes | str) -> Any:
    """Decode one JSON document; ValueError when it is not exactly one."""
    text = data.decode() if isinstance(data, bytes) else data
    start = len(text) - len(text.lstrip(_WHITESPACE))
    try:
        value, end = _scan_once(text, start)
    except StopIteration:
        raise ValueError("not a JSON document") from None
    if text[end:].strip(_WHITESPACE):
        raise ValueError(f"extra data after the JSON document at offset {end}")
    return value


def dumps(value: Any) -> bytes:
    return "".join(_encode(value, 0)).encode()
