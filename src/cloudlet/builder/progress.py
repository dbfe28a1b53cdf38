"""Following a build through the engine's progress messages (pure).

The classic builder streams JSON messages: ``stream`` text (``Step 2/5 : RUN ...``, the
step's output, `` ---> ...`` bookkeeping), ``status`` lines, ``aux`` with the image id, and
on failure one message with ``error``/``errorDetail``. ``BuildProgress`` turns them into whole
log lines and remembers the current step with its recent output, so a failure can be
reported as the failing step, what it printed last and the engine's error.
"""

from __future__ import annotations

import re
from collections import deque
from collections.abc import Mapping
from typing import Any, Final

STEP: Final = re.compile(r"^Step (\d+)/(\d+) : (.*)$")
TAIL_LINES: Final = 40
"""Lines of the failing step's output kept for the error message."""
# The engine wraps what a step writes to stderr in terminal colour codes.
_COLOUR: Final = re.compile(r"\x1b\[[0-9;]*m")
_BOOKKEEPING: Final = re.compile(
    r"^( ---> |Removing intermediate container |Successfully (built|tagged) )"
)


class BuildProgress:
    """Feed it the engine's messages in order; it yields log lines and tracks the step."""

    def __init__(self) -> None:
        self.step = ""
        self.error: str | None = None
        self.image_id = ""
        self.output: deque[str] = deque(maxlen=TAIL_LINES)
        self._partial = ""

    def feed(self, message: Mapping[str, Any]) -> list[str]:
        """The complete log lines this message finishes."""
        lines: list[str] = []
        if isinstance(message.get("stream"), str):
            lines = self._split(message["stream"])
        elif message.get("status") and "progress" not in message:
            ident = f"{message['id']}: " if message.get("id") else ""
            lines = [f"{ident}{message['status']}"]
        aux = message.get("aux")
        if isinstance(aux, Mapping) and aux.get("ID"):
            self.image_id = str(aux["ID"])
        for line in lines:
            self._track(line)
        if "error" in message or "errorDetail" in message:
            lines += self.flush()
            self.error = error_text(message)
            lines.append(f"ERROR: {self.error}")
        return lines

    def flush(self) -> list[str]:
        """A last line the stream left without its newline."""
        rest, self._partial = _COLOUR.sub("", self._partial), ""
        if rest:
            self._track(rest)
            return [rest]
        return []

    def failure(self) -> str:
        """The failing step, the last lines it printed, and the engine's error."""
        parts = [self.step] if self.step else []
        parts += list(self.output)
        parts.append(self.error or "the build failed")
        return "\n".join(parts)

    def _split(self, text: str) -> list[str]:
        *complete, self._partial = (self._partial + text).split("\n")
        return [_COLOUR.sub("", line).rstrip("\r") for line in complete]

    def _track(self, line: str) -> None:
        if STEP.match(line):
            self.step = line
            self.output.clear()
        elif line.strip() and not _BOOKKEEPING.match(line):
            self.output.append(line)


def error_text(message: Mapping[str, Any]) -> str:
    detail = message.get("errorDetail")
    if isinstance(detail, Mapping) and detail.get("message"):
        return str(detail["message"]).strip()
    return str(message.get("error") or "the build failed").strip()


def cap_log(text: str, limit: int) -> str:
    """The last ``limit`` characters of a log (the end says why a build failed)."""
    if len(text) <= limit:
        return text
    return f"[... the first {len(text) - limit} characters are not kept ...]\n" + text[-limit:]
