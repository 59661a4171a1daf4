"""One section of ``compir doctor``'s report: a summary line, its figures, and what is missing with how to get it."""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Section:
    """``name``: the report's key (``cpu``, ``gpu``, ...); ``summary``: one line; ``details``: JSON
    values; ``missing``: one line per missing piece, each saying how to get it; ``lines``: more to
    show below the summary in the text report (the JSON has it in ``details``)."""

    name: str
    summary: str
    details: dict[str, Any] = field(default_factory=dict)
    missing: tuple[str, ...] = ()
    lines: tuple[str, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        return {"summary": self.summary, **self.details, "missing": list(self.missing)}


def run_checked(command: Sequence[str], *, timeout: float = 10.0) -> str | None:
    """stdout of ``command``, or None where it is absent, fails (its return code is checked) or hangs."""
    if shutil.which(command[0]) is None:
        return None
    try:
        result = subprocess.run(list(command), capture_output=True, text=True, timeout=timeout, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return result.stdout.strip() if result.returncode == 0 else None
