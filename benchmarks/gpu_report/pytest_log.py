"""Reading pytest's output: the outcome counts and the first error of a log."""

from __future__ import annotations

import re
from typing import Dict

_COUNT_RE = re.compile(r"(\d+) (passed|failed|skipped|errors?|xfailed|xpassed|deselected)")
_VERBOSE_RE = re.compile(r"::\S+ (PASSED|FAILED|SKIPPED|ERROR|XFAIL|XPASS)")


def pytest_counts(text: str) -> Dict[str, int]:
    """Counts from pytest's last summary line; from its verbose lines when it was killed before that."""
    counts: Dict[str, int] = {}
    for line in reversed(text.splitlines()):
        if re.search(r"\b(passed|failed|skipped|error|errors|deselected|no tests ran)\b", line) and re.search(
            r" in [0-9.]+s", line
        ):
            for n, what in _COUNT_RE.findall(line):
                counts["errors" if what.startswith("error") else what] = int(n)
            return counts
    for what in _VERBOSE_RE.findall(text):
        key = {"ERROR": "errors", "XFAIL": "xfailed", "XPASS": "xpassed"}.get(what, what.lower())
        counts[key] = counts.get(key, 0) + 1
    return counts


def first_error(text: str) -> str:
    """The first line that says what went wrong."""
    lines = text.splitlines()
    for pattern in (r"^(FAILED|ERROR)[ :]", r"^E\s+\S", r"Error\b|error:|Traceback"):
        for line in lines:
            if re.search(pattern, line) and not line.startswith("$ "):
                return " ".join(line.split())[:300]
    tail = [l for l in lines if l.strip() and not l.startswith("$ ")]
    return " ".join(tail[-1].split())[:300] if tail else ""


def _read(path: str, offset: int = 0) -> str:
    try:
        with open(path, errors="replace") as f:
            f.seek(offset)
            return f.read()
    except OSError:
        return ""


def _append(dst: str, header: str, text: str, limit: int = 400_000) -> None:
    if len(text) > limit:  # keep the end, where pytest's summary is
        text = f"[... {len(text) - limit} characters cut ...]\n" + text[-limit:]
    with open(dst, "a") as f:
        f.write(f"\n===== {header}\n{text}")
