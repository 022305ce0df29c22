"""The files a preprocessing run writes under `--output-prefix` appear as one set, or not at all.

Why: a dataset is several files read together (`.bin`/`.idx`, or shards `PREFIX_00000...`,
`PREFIX.vocab.json`, `PREFIX.stats.json`, `PREFIX.rejects.jsonl`, `PREFIX.loss_mask.npy`), and
readers trust that they belong together. Writing them in place let a failed or killed re-run
leave old shards beside a new layout, or new shards 0-3 among old shards 4-14 under the old
stats: data that looks valid and is wrong. So:

- an existing set is refused up front (`check_output_prefix`), unless `--overwrite` is given;
- a run writes everything into a hidden staging folder next to the output
  (`.NAME.staging-PID/`, same file system, so publishing is renames) and `StagedOutput.publish`
  moves the finished set into place: the old set's files are removed first (layout and stats
  first of all, so an interrupted publish leaves no layout, which every reader refuses), then
  the new data, then the rejects and loss mask, and the new layout and stats last;
- a failure before publishing removes the staging folder; a SIGKILL leaves it, and the next
  run on the same prefix removes it once its process is gone.

`ShardWriter` and `RejectLog` (the writers of tools/preprocess_interleaved.py and
tools/preprocess_instruct.py) live here too: they are what gets staged.
"""

from __future__ import annotations

import glob
import json
import os
import re
import shutil
from typing import Any, Dict, List, Optional

import numpy as np

from megatron_jam.data.indexed_builder import DocumentBatch, IndexedDatasetBuilder, merge_datasets
from megatron_jam.utils.logging import get_logger

logger = get_logger(__name__)

SET_SUFFIXES = (".bin", ".idx", ".rejects.jsonl", ".loss_mask.npy", ".neighbors.npy", ".neighbors.json",
                ".vocab.json", ".stats.json")
"""Files of one dataset set besides its shards; derived files (retrieval neighbours) go with the data."""
_LAST = (".vocab.json", ".stats.json")
_SHARD_FILE = re.compile(r"_\d{5}\.(bin|idx)$")


class OutputExistsError(ValueError):
    """`--output-prefix` already holds a dataset set and `--overwrite` was not given."""


def existing_set(prefix: str) -> List[str]:
    """The files of the dataset set at `prefix` that exist (its shards included)."""
    found = [prefix + s for s in SET_SUFFIXES if os.path.lexists(prefix + s)]
    shards = [p for p in glob.glob(glob.escape(prefix) + "_*") if _SHARD_FILE.search(p[len(prefix):])]
    return sorted(found + shards)


def check_output_prefix(prefix: str, overwrite: bool) -> None:
    """Refuse an output prefix that already holds a set, unless the user asked to replace it."""
    found = existing_set(prefix)
    if found and not overwrite:
        raise OutputExistsError(
            f"--output-prefix {prefix} already holds a dataset ({len(found)} files, e.g. {found[0]}); pass "
            "--overwrite to replace it (the old files are removed only once the new set is complete)")


def _publish_order(name: str) -> tuple:
    """Data first (.bin before .idx), the layout and stats last: a reader never sees a finished
    layout beside data of another run."""
    for rank, suffix in enumerate(_LAST):
        if name.endswith(suffix):
            return (3 + rank, name)
    return (0 if name.endswith(".bin") else 1 if name.endswith(".idx") else 2, name)


def _process_alive(pid: int) -> bool:
    """Whether the run that owns a staging folder may still be writing it (another user's process counts)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class StagedOutput:
    """A staging folder for the set of `prefix`; `prefix` is where the tool writes, `publish` moves it out.

    Args:
        final_prefix: the user's `--output-prefix`.
        durable: fsync the output folder after publishing (the files themselves are fsynced by
            their writers under `--durable`).
    """

    def __init__(self, final_prefix: str, durable: bool = False) -> None:
        self.final_prefix, self.durable = final_prefix, durable
        self.folder, self.name = os.path.split(os.path.abspath(final_prefix))
        remove_stale_staging(self.folder, self.name)
        self.dir = os.path.join(self.folder, f".{self.name}.staging-{os.getpid()}")
        os.makedirs(self.dir)
        self.prefix = os.path.join(self.dir, self.name)

    def final(self, path: str) -> str:
        """The published name of a staged path (e.g. the outputs listed in the stats)."""
        return self.final_prefix + path[len(self.prefix):] if path.startswith(self.prefix) else path

    def publish(self, overwrite: bool) -> List[str]:
        """Replace the old set (if any, and only with `overwrite`) by the staged one; returns the new files."""
        check_output_prefix(self.final_prefix, overwrite)  # nobody wrote there since the start
        old = existing_set(self.final_prefix)
        for path in sorted(old, key=lambda p: _publish_order(p), reverse=True):  # layout and stats first
            os.remove(path)
        names = sorted(os.listdir(self.dir), key=_publish_order)
        for name in names:
            os.replace(os.path.join(self.dir, name), os.path.join(self.folder, name))
        os.rmdir(self.dir)
        if self.durable:
            fd = os.open(self.folder, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        if old:
            logger.info("replaced the %d files of the old set at %s", len(old), self.final_prefix)
        return [os.path.join(self.folder, n) for n in names]

    def abort(self) -> None:
        """Drop everything staged (the old set, if any, stays as it was)."""
        shutil.rmtree(self.dir, ignore_errors=True)


def remove_stale_staging(folder: str, name: str) -> None:
    """Staging folders of `name` left by killed runs (their process is gone) hold nothing usable."""
    pattern = re.compile(rf"^\.{re.escape(name)}\.staging-(\d+)$")
    for entry in os.listdir(folder) if os.path.isdir(folder) else []:
        match = pattern.match(entry)
        if match and int(match.group(1)) != os.getpid() and not _process_alive(int(match.group(1))):
            logger.info("removing %s, left by a run that did not finish", os.path.join(folder, entry))
            shutil.rmtree(os.path.join(folder, entry), ignore_errors=True)


# --------------------------------------------------------------------------- writers that get staged
class ShardWriter:
    """Writes DocumentBatches into one output or into shards of `shard_size` documents/tokens."""

    def __init__(self, prefix: str, dtype: Any, shard_size: int, unit: str, durable: bool) -> None:
        self.prefix, self.dtype, self.shard_size, self.unit, self.durable = prefix, dtype, shard_size, unit, durable
        self.shards: List[str] = []
        self.builder: Optional[IndexedDatasetBuilder] = None
        self.filled = 0

    def _open(self) -> None:
        name = self.prefix if not self.shard_size else f"{self.prefix}_{len(self.shards):05d}"
        self.shards.append(name)
        self.builder = IndexedDatasetBuilder(name + ".bin", self.dtype, multimodal=True, durable=self.durable)
        self.filled = 0

    def _close(self) -> None:
        self.builder.finalize(self.shards[-1] + ".idx")
        self.builder = None

    def _room(self, batch: DocumentBatch) -> int:
        """How many documents of `batch` fit into the current shard."""
        left = self.shard_size - self.filled
        if self.unit == "documents":
            return left
        starts = np.concatenate([[0], np.cumsum(batch.document_lengths)[:-1]]).astype(np.int64)
        seq_tokens = np.concatenate([[0], np.cumsum(batch.sequence_lengths)])
        doc_tokens = seq_tokens[starts + batch.document_lengths] - seq_tokens[starts]
        return int(np.searchsorted(np.cumsum(doc_tokens), left, side="left")) + 1

    def add_batch(self, batch: DocumentBatch) -> None:
        while batch.num_documents:
            if self.builder is None:
                self._open()
            if not self.shard_size:
                self.builder.add_batch(batch)
                return
            head, batch = batch.split(self._room(batch))
            self.builder.add_batch(head)
            self.filled += head.num_documents if self.unit == "documents" else head.num_tokens
            if self.filled >= self.shard_size:
                self._close()

    def finish(self, merge: bool) -> List[str]:
        """Finalize; a single shard is renamed to PREFIX, `merge` joins several into PREFIX."""
        if self.builder is None and not self.shards:
            self._open()
        if self.builder is not None:
            self._close()
        if self.shard_size and len(self.shards) == 1:
            publish_rename(self.shards[0], self.prefix)
            self.shards = [self.prefix]
        elif merge and len(self.shards) > 1:
            merge_datasets(self.shards, self.prefix, multimodal=True, durable=self.durable)
            for shard in self.shards:
                os.remove(shard + ".idx")
                os.remove(shard + ".bin")
            self.shards = [self.prefix]
        return self.shards

    def abort(self) -> None:
        if self.builder is not None:
            self.builder.abort()


def publish_rename(src: str, dst: str) -> None:
    """Move dataset src -> dst so that dst.idx never describes another .bin."""
    if os.path.exists(dst + ".idx"):
        os.remove(dst + ".idx")
    os.replace(src + ".bin", dst + ".bin")
    os.replace(src + ".idx", dst + ".idx")


class RejectLog:
    """Streams rejects to PREFIX.rejects.jsonl and counts them by reason."""

    def __init__(self, prefix: str) -> None:
        self.path = prefix + ".rejects.jsonl"
        self.file = open(self.path, "w", encoding="utf-8", errors="backslashreplace")  # lone surrogates
        self.by_reason: Dict[str, int] = {}

    def write(self, entries: List[dict]) -> None:
        for entry in entries:
            self.file.write(json.dumps(entry, ensure_ascii=False) + "\n")
            self.by_reason[entry["reason"]] = self.by_reason.get(entry["reason"], 0) + 1

    @property
    def count(self) -> int:
        return sum(self.by_reason.values())

    def close(self) -> None:
        self.file.close()
