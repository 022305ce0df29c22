"""JSON Lines reading for prompt and config files: one place that names the file and line of a bad record.

Why: every tool that reads a small JSON Lines file (prompt sets, prompts files) must fail on a bad line
with "FILE:LINE: ..." and skip blank lines the same way; the data tools, which skip and count bad
documents instead, have their own reader (`tools/preprocess_interleaved.py`).
"""

from __future__ import annotations

import json
from typing import Iterator


def read_records(path: str, what: str = "a JSON object") -> Iterator[tuple[int, dict]]:
    """(line number, record) for every non-blank line; ValueError "PATH:LINE: ..." for invalid JSON or a
    record that is not an object (`what` says what was expected)."""
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{n}: invalid JSON ({e})") from e
            if not isinstance(rec, dict):
                raise ValueError(f"{path}:{n}: expected {what}")
            yield n, rec
