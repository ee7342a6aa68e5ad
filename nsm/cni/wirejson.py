"""JSON for the plugin's hot start, on the C accelerator ``_json`` alone.

``import json`` costs ~14 ms at every start of ``nsm-cni`` (``json.decoder`` imports ``re``,
which imports ``enum``, ``functools``...), more than the plugin's own work; the runtime starts
the plugin for every ADD, DEL and CHECK of every pod. The same C scanner and encoder ``json``
itself uses are reached here directly: same results (``tests/cni/test_cni_wirejson.py`` compares
them with ``json``), errors as ``ValueError``. Without ``_json`` (another interpreter) it falls
back to ``json``.
"""

from __future__ import annotations

TYPE_CHECKING = False  # importing typing costs milliseconds at every start of the plugin
if TYPE_CHECKING:
    from typing import Any

try:
    import _json
except ImportError:  # pragma: no cover - CPython always has it
    _json = None  # type: ignore[assignment]

_WHITESPACE = " \t\n\r"
_CONSTANTS = {"NaN": float("nan"), "Infinity": float("inf"), "-Infinity": float("-inf")}


class _Context:
    """What the C scanner reads from a ``json.JSONDecoder`` (its defaults)."""

    strict = True
    object_hook = None
    object_pairs_hook = None
    parse_float = float
    parse_int = int
    parse_constant = _CONSTANTS.__getitem__


def _skip(text: str, at: int) -> int:
    while at < len(text) and text[at] in _WHITESPACE:
        at += 1
    return at


def loads(data: str | bytes | bytearray) -> Any:
    """One JSON document (bytes are UTF-8); ValueError (or UnicodeDecodeError) when it is not."""
    text = data.decode("utf-8") if isinstance(data, bytes | bytearray) else data
    if _json is None:  # pragma: no cover
        import json
        return json.loads(text)
    scan = _json.make_scanner(_Context())
    start = _skip(text, 0)
    try:
        value, end = scan(text, start)
    except StopIteration as stop:
        raise ValueError(f"expecting a JSON value at character {stop.value}") from None
    except SystemError:
        # The C scanner raises its error (json.decoder.JSONDecodeError) only once json.decoder
        # is imported; until then it fails without one. Malformed input: let json say why.
        import json
        return json.loads(text)
    end = _skip(text, end)
    if end != len(text):
        raise ValueError(f"extra data after the JSON value at character {end}")
    return value


def _not_serializable(value: Any) -> Any:
    raise TypeError(f"{type(value).__name__} is not JSON serializable")


def dumps(value: Any, *, compact: bool = False) -> str:
    """``json.dumps(value)`` (``separators=(",", ":")`` when ``compact``), ASCII only."""
    item, key = (",", ":") if compact else (", ", ": ")
    if _json is None:  # pragma: no cover
        import json
        return json.dumps(value, separators=(item, key))
    encode = _json.make_encoder({}, _not_serializable, _json.encode_basestring_ascii, None,
                                key, item, False, False, True)
    return "".join(encode(value, 0))
