"""Text from users made safe to print or log: control characters (ESC sequences that repaint a
terminal, carriage returns that hide a line, a newline that forges a log entry) become visible escapes."""

from __future__ import annotations

from typing import Any

_CONTROLS = [*range(0x20), *range(0x7F, 0xA0)]
_ESCAPES = {code: f"\\x{code:02x}" for code in _CONTROLS}
_ESCAPES_KEEP_LINES = {code: text for code, text in _ESCAPES.items() if code not in (0x0A, 0x09)}


def printable(text: str) -> str:
    """``text`` on one line, every control character (newline included) written as ``\\xNN``."""
    return text.translate(_ESCAPES)


def printable_lines(text: str) -> str:
    """Like :func:`printable`, but newlines and tabs stay (a table, a multi-line message), and a
    serial console's CRLF is a newline."""
    return text.replace("\r\n", "\n").translate(_ESCAPES_KEEP_LINES)


class PrintableStream:
    """A text stream that writes through :func:`printable_lines` (the CLI's stdout and stderr)."""

    def __init__(self, stream: Any) -> None:
        self.stream = stream

    def write(self, text: str) -> int:
        self.stream.write(printable_lines(text))
        return len(text)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.stream, name)
