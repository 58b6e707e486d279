"""Reading files (and endpoint bodies) back: strict UTF-8, JSON / JSONL, and field checks.

Every reader here turns what a bad file can throw (`UnicodeDecodeError`, `JSONDecodeError`, a
value of the wrong type) into a one-line `PivotfuseError` that names the file, the line where
there is one, and the field, so a corrupt input or a hand-edited output never ends in a
traceback. Text is always decoded as UTF-8, strictly: a file in another encoding is refused at
the first bad byte instead of being read as mojibake.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable, Iterator

from core.errors import PivotfuseError


def brief(value: Any, width: int = 60) -> str:
    """`repr(value)`, cut to `width` characters (an error line must stay short)."""
    text = repr(value)
    return text if len(text) <= width else text[:width - 3] + "..."


def is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def is_str_list(value: Any) -> bool:
    return isinstance(value, list) and all(isinstance(v, str) for v in value)


def is_number_list(value: Any) -> bool:
    return isinstance(value, list) and all(is_number(v) for v in value)


def need(obj: dict, key: str, ok: Callable[[Any], bool], want: str, where: str, name: str | None = None) -> Any:
    """`obj[key]` when `ok` accepts it; else one line: '<where>: missing field' or '<where>: '<name>'
    must be <want>, got <value>' (`name` is the field's full path, default `key`)."""
    name = name or key
    if key not in obj:
        raise PivotfuseError(f"{where}: missing field '{name}'")
    value = obj[key]
    if not ok(value):
        raise PivotfuseError(f"{where}: '{name}' must be {want}, got {brief(value)}")
    return value


def decode_utf8(data: bytes, where: str, first_line: int | None = 1) -> str:
    """`data` as UTF-8 text; else an error naming `where`, the line (counted from `first_line`;
    None: a body without lines, the byte offset instead) and the bad byte."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        if first_line is None:
            raise PivotfuseError(f"{where}: not UTF-8 text (byte 0x{data[e.start]:02x} at offset {e.start})") from None
        line = first_line + data.count(b"\n", 0, e.start)
        column = e.start - (data.rfind(b"\n", 0, e.start) + 1) + 1
        raise PivotfuseError(f"{where}:{line}: not UTF-8 text (byte 0x{data[e.start]:02x} at column {column})") from None


def read_bytes(path: str | Path) -> bytes:
    p = Path(path)
    if not p.is_file():
        raise PivotfuseError(f"{p}: file not found")
    try:
        return p.read_bytes()
    except OSError as e:
        raise PivotfuseError(f"{p}: cannot read ({e.strerror or e})") from None


def read_text(path: str | Path) -> str:
    """The UTF-8 text of a file (newlines as written); missing or undecodable → one-line error."""
    return decode_utf8(read_bytes(path), str(path))


def parse_json(text: str, where: str, first_line: int | None = 1) -> Any:
    """`json.loads(text)`; a syntax error names `where` and the line (as in `decode_utf8`)."""
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        line = "" if first_line is None else f":{first_line + e.lineno - 1}"
        raise PivotfuseError(f"{where}{line}: invalid JSON ({e.msg})") from None


def read_json(path: str | Path, what: str = "a JSON object") -> dict:
    """A JSON file whose top level is an object (`what` names it in the error otherwise)."""
    data = parse_json(read_text(path), str(path))
    if not isinstance(data, dict):
        raise PivotfuseError(f"{path}: expected {what} at the top level, got {type(data).__name__}")
    return data


def _raw_lines(path: Path) -> Iterator[tuple[int, bytes, bool]]:
    """(line number, bytes without the line break, ended by a line break) per line, streamed.

    Lines break at `\\n`, `\\r\\n` and a lone `\\r`, as text-mode reading does (UTF-8 never has
    0x0A or 0x0D inside a character, so splitting the bytes first is safe)."""
    if not path.is_file():
        raise PivotfuseError(f"{path}: file not found")
    n = 0
    with path.open("rb") as fh:
        for raw in fh:
            ended = raw.endswith(b"\n")
            body = raw[:-1] if ended else raw
            if body.endswith(b"\r"):
                body, ended = body[:-1], True
            parts = body.split(b"\r")
            for i, part in enumerate(parts):
                n += 1
                yield n, part, ended or i < len(parts) - 1


def _object(obj: Any, path: Path, n: int) -> dict:
    if not isinstance(obj, dict):
        raise PivotfuseError(f"{path}:{n}: expected a JSON object, got {type(obj).__name__}")
    return obj


def read_jsonl(path: str | Path) -> Iterator[tuple[int, dict]]:
    """Yield (line number, object) for each non-blank line; a line that is not UTF-8, not JSON or
    not an object is an error naming the file and the line."""
    p = Path(path)
    for n, raw, _ in _raw_lines(p):
        text = decode_utf8(raw, str(p), n)
        if text.strip():
            yield n, _object(parse_json(text, str(p), n), p, n)


def read_jsonl_resumable(path: str | Path) -> tuple[list[tuple[int, dict]], bool]:
    """(rows with line numbers, torn) of a JSONL file the tool appends to: a last line without a
    line break that does not decode or parse (a run killed mid-append, maybe inside a UTF-8
    character) is left out and `torn` is True; any other bad line is an error. A missing file
    has no rows."""
    p = Path(path)
    if not p.is_file():
        return [], False
    rows = []
    for n, raw, ended in _raw_lines(p):
        try:
            text = decode_utf8(raw, str(p), n)
            if not text.strip():
                continue
            obj = parse_json(text, str(p), n)
        except PivotfuseError:
            if ended:
                raise
            return rows, True
        rows.append((n, _object(obj, p, n)))
    return rows, False
