"""Parsing of the user's quantities: CPU (``1``, ``500m``), memory (``512Mi``, ``1G``),
durations (``300``, ``300s``, ``10m5s``, ``1h``). Each parser names the field on error."""

from __future__ import annotations

import re

from cloudlet.domain.errors import InvalidError

_BINARY = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40}
_DECIMAL = {"k": 10**3, "K": 10**3, "M": 10**6, "G": 10**9, "T": 10**12}
_MEMORY = re.compile(r"^([0-9]+(?:\.[0-9]+)?)(Ki|Mi|Gi|Ti|k|K|M|G|T)?$")
_CPU = re.compile(r"^([0-9]+(?:\.[0-9]+)?)(m?)$")
_DURATION_PART = re.compile(r"([0-9]+)(h|m|s)")
_UNIT_SECONDS = {"h": 3600, "m": 60, "s": 1}


def parse_memory(value: str, field: str = "memory") -> int:
    """Bytes in a Kubernetes memory quantity such as ``512Mi`` or ``1G``."""
    match = _MEMORY.match(str(value).strip())
    if not match:
        raise InvalidError(
            f"{field}: {value!r} is not a memory quantity; use a number with a unit such as "
            "512Mi, 1Gi or 2G",
            field=field,
        )
    number, unit = match.groups()
    scale = _BINARY.get(unit or "") or _DECIMAL.get(unit or "", 1)
    result = int(float(number) * scale)
    if result <= 0:
        raise InvalidError(f"{field}: must be greater than zero, got {value!r}", field=field)
    return result


def format_memory(num_bytes: int) -> str:
    """The shortest exact binary-suffixed form: 536870912 -> ``512Mi``."""
    for unit in ("Ti", "Gi", "Mi", "Ki"):
        if num_bytes % _BINARY[unit] == 0:
            return f"{num_bytes // _BINARY[unit]}{unit}"
    return str(num_bytes)


def parse_cpu(value: str, field: str = "cpu") -> int:
    """Millicores in a CPU quantity: ``1`` -> 1000, ``500m`` -> 500, ``0.5`` -> 500."""
    match = _CPU.match(str(value).strip())
    if not match:
        raise InvalidError(
            f"{field}: {value!r} is not a CPU quantity; use whole or fractional CPUs "
            "(1, 2, 0.5) or millicores (500m)",
            field=field,
        )
    number, milli = match.groups()
    result = int(float(number)) if milli else round(float(number) * 1000)
    if result <= 0:
        raise InvalidError(f"{field}: must be greater than zero, got {value!r}", field=field)
    return result


def format_cpu(millicores: int) -> str:
    """``1000`` -> ``1``, ``500`` -> ``500m``."""
    return str(millicores // 1000) if millicores % 1000 == 0 else f"{millicores}m"


def parse_duration(value: str | int, field: str = "timeout") -> int:
    """Whole seconds in ``300``, ``300s``, ``10m5s`` or ``1h``."""
    text = str(value).strip()
    if text.isdigit():
        return int(text)
    parts = _DURATION_PART.findall(text)
    if not parts or "".join(n + u for n, u in parts) != text:
        raise InvalidError(
            f"{field}: {value!r} is not a duration; use seconds (300) or units h, m, s (10m5s)",
            field=field,
        )
    return sum(int(number) * _UNIT_SECONDS[unit] for number, unit in parts)
