"""The elements of a JSON array file, decoded one at a time (LLaVA / Cambrian instruction files are one array).

A multi-gigabyte array is never held whole in memory: the file is read in chunks and each element is decoded
as soon as it is complete. A file that is not one JSON array raises :class:`DataError` naming the character
offset of the problem (a broken array cannot be resynchronised, so that is a problem of the whole file).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

from scale_rae_core.errors import DataError

CHUNK = 1 << 20  # characters read at a time
_SPACE = " \t\r\n"


def first_char(path: Path) -> str:
    """The first character of ``path`` that is not white space ('' for a blank file)."""
    with path.open(encoding="utf-8-sig", errors="replace") as f:
        while chunk := f.read(4096):
            stripped = chunk.lstrip(_SPACE)
            if stripped:
                return stripped[0]
    return ""


def iter_json_array(path: Path) -> Iterator[Any]:
    """Yield the elements of the JSON array in ``path``, in order."""
    reader = _ArrayReader(path)
    try:
        with path.open(encoding="utf-8-sig") as f:
            yield from reader.elements(f)
    except UnicodeDecodeError as err:
        raise DataError(f"{path}: not UTF-8 text ({err.reason}); save it as UTF-8") from None


class _ArrayReader:
    def __init__(self, path: Path) -> None:
        self.path = path
        self.decoder = json.JSONDecoder()
        self.buf, self.pos, self.consumed = "", 0, 0  # consumed: characters dropped before buf
        self.file: IO[str] | None = None

    def elements(self, f: IO[str]) -> Iterator[Any]:
        self.file = f
        if self._peek() != "[":
            raise self._error("the file does not start with '['", self.pos)
        self.pos += 1
        if self._peek() == "]":
            self.pos += 1
        else:
            while True:
                yield self._value()
                c = self._peek()
                self.pos += 1
                if c == "]":
                    break
                if c != ",":
                    raise self._error("expected ',' or ']' after an element", self.pos - 1)
        if self._peek() != "":
            raise self._error("data after the closing ']'", self.pos)

    def _fill(self) -> bool:
        """Read the next chunk, dropping what was already parsed; False at the end of the file."""
        assert self.file is not None
        chunk = self.file.read(CHUNK)
        if not chunk:
            return False
        self.consumed += self.pos
        self.buf, self.pos = self.buf[self.pos :] + chunk, 0
        return True

    def _peek(self) -> str:
        """The next character that is not white space, reading on as needed ('' at the end of the file)."""
        while True:
            while self.pos < len(self.buf) and self.buf[self.pos] in _SPACE:
                self.pos += 1
            if self.pos < len(self.buf):
                return self.buf[self.pos]
            if not self._fill():
                return ""

    def _value(self) -> Any:
        self._peek()  # raw_decode does not skip leading white space
        while True:
            try:
                value, end = self.decoder.raw_decode(self.buf, self.pos)
            except json.JSONDecodeError as err:
                if self._fill():  # the element may only be cut off by the chunk end
                    continue
                raise self._error(err.msg, err.pos) from None
            except RecursionError:
                raise self._error("an element is nested too deeply", self.pos) from None
            if self._number_may_go_on(value, end) and self._fill():  # "-0" may be "-0.5" after the chunk end
                continue
            self.pos = end
            return value

    def _number_may_go_on(self, value: Any, end: int) -> bool:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return False  # objects, arrays, strings and literals end with their own closing character
        return end == len(self.buf) or self.buf[end] in "0123456789.eE+-"

    def _error(self, what: str, pos: int) -> DataError:
        return DataError(
            f"{self.path}: not a valid JSON array ({what} at character {self.consumed + pos}); "
            "fix the file, or write one JSON object per line (.jsonl)"
        )
