"""Bounds on the names that become label values or table keys (EP group, node, agent
id, sampler labels): at most 128 bytes, and only characters that read well in a label
and in a log line. A name is checked before anything is stored under it.
"""

from __future__ import annotations

import re

from epwatch.schema import RecordError

MAX_NAME_BYTES = 128
# Host and Kubernetes node names, `node:pid:hex` agent ids, `model/prefill` groups.
_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.:/@+=-]*")
# Sampler label values (device names, reasons, GPU models) may hold spaces: printable
# ASCII or UTF-8 text, no control characters.
_CONTROL_RE = re.compile(r"[\x00-\x1f\x7f]")


def name_error(value: str) -> str | None:
    """Why ``value`` is not an acceptable name, or None."""
    size = len(value.encode())
    if size > MAX_NAME_BYTES:
        return f"is {size} bytes (at most {MAX_NAME_BYTES})"
    if not _NAME_RE.fullmatch(value):
        return "must start with a letter or digit and hold only [A-Za-z0-9_.:/@+=-]"
    return None


def check_name(kind: str, value: str) -> None:
    """Raise RecordError(reason='bad_name') when ``value`` is not a safe ``kind`` name."""
    why = name_error(value)
    if why is not None:
        shown = value[:40] + ("..." if len(value) > 40 else "")
        raise RecordError("bad_name", f"{kind} {shown!r} {why}")


def check_label_value(kind: str, value: str) -> None:
    """Raise RecordError(reason='bad_name') for a label value too long or with control
    characters (a newline would break the exposition format for every scraper)."""
    size = len(value.encode())
    if size > MAX_NAME_BYTES:
        raise RecordError("bad_name", f"{kind} is {size} bytes (at most {MAX_NAME_BYTES})")
    if _CONTROL_RE.search(value):
        raise RecordError("bad_name", f"{kind} {value[:40]!r} holds control characters")
