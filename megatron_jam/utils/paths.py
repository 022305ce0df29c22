"""Output folders checked before any work: a run or a conversion must not fail at its end on a bad `--save`.

Why a probe instead of `os.access`: the checks run as root on many clusters (where `os.access` says yes to
everything) and on read-only or special file systems; creating and removing a temporary folder is the
question actually asked.
"""

import os
import shutil
import tempfile


def output_dir_problem(path: str) -> str | None:
    """Why `path` cannot be (created and) written as a folder, or None. Creates nothing that stays."""
    if os.path.exists(path) and not os.path.isdir(path):
        return "is a file, not a folder"
    existing = os.path.abspath(path)
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        return f"cannot be created: {existing} is a file"
    try:
        probe = tempfile.mkdtemp(prefix=".write-probe-", dir=existing)
    except OSError as e:
        return f"cannot be written ({e.strerror or e} in {existing})"
    shutil.rmtree(probe, ignore_errors=True)
    return None


def output_file_problem(path: str) -> str | None:
    """Why the file `path` cannot be written (its folder), or None."""
    if os.path.isdir(path):
        return "is a folder, not a file"
    problem = output_dir_problem(os.path.dirname(os.path.abspath(path)))
    return f"its folder {problem}" if problem else None
