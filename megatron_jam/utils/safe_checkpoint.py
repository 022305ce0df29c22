"""Reading `dist_checkpointing` checkpoints without running code: the one door every checkpoint reader uses.

Why: a checkpoint is often someone else's file. PyTorch's distributed-checkpoint reader unpickles
`.metadata` with plain `pickle` and loads every non-tensor item (`BYTE_IO`: RNG states, `_extra_state`)
with `torch.load(weights_only=False)`; Megatron-Core reads `common.pt` with `torch.load`, whose
weights-only default an environment variable can switch off. Any of them runs code planted in the file.

Here `.metadata` is read by a restricted unpickler that admits exactly the classes of the PyTorch
distributed-checkpoint format (`METADATA_GLOBALS`, found by listing the globals of real checkpoints of
the trainer and the converter), and the byte items and `common.pt` by `torch.load(weights_only=True)`
plus the three numpy globals of a saved numpy RNG state. Anything else fails with a one-line
`CheckpointError` naming the file, before the offending object is built.

The same reader checks the checkpoint's structure before any tensor is read: every file the metadata
names exists and is long enough, so a truncated or missing shard is named instead of failing later as
an `EOFError` deep in PyTorch.

Use `load` / `load_common_state_dict` here instead of `megatron.core.dist_checkpointing`'s.
"""

import contextlib
import io
import json
import os
import pickle
import re

import numpy as np
import torch
from megatron.core import dist_checkpointing
from megatron.core.dist_checkpointing.core import CheckpointingException
from megatron.core.dist_checkpointing.strategies import torch as mcore_torch
from megatron.core.dist_checkpointing.strategies.cached_metadata_filesystem_reader import (
    CachedMetadataFileSystemReader)
from megatron.core.dist_checkpointing.strategies.common import COMMON_STATE_FNAME, TorchCommonLoadStrategy
from torch.distributed.checkpoint._traverse import set_element
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.metadata import Metadata, StorageMeta

METADATA_FILE = ".metadata"

METADATA_GLOBALS = frozenset({
    ("torch", "Size"),
    ("pathlib", "PosixPath"),  # StorageMeta.checkpoint_id of a FileSystemWriter given a Path (the converter's saves)
    ("torch.serialization", "_get_layout"),  # looks a layout up by name
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
    *(("torch.distributed.checkpoint.metadata", n) for n in (
        "Metadata", "MetadataIndex", "StorageMeta", "BytesStorageMetadata", "ChunkStorageMetadata",
        "TensorProperties", "TensorStorageMetadata", "_MEM_FORMAT_ENCODING")),
    *(("torch.distributed.checkpoint.planner", n) for n in ("SavePlan", "TensorWriteData", "WriteItem",
                                                             "WriteItemType")),
})
"""The (module, name) globals a distributed checkpoint's `.metadata` may reference (besides dtypes)."""

NUMPY_RNG_GLOBALS = [np._core.multiarray._reconstruct, np.ndarray, np.dtype]
"""What `torch.load(weights_only=True)` needs beyond its defaults for `numpy.random.get_state()`."""

_REFUSED = re.compile(r"GLOBAL ([\w.]+)")


class CheckpointError(ValueError):
    """A checkpoint that cannot be read safely or completely; the message (one line) names the file."""


class CheckpointMismatchError(CheckpointError):
    """The checkpoint does not fit the model it is loaded into (Megatron's validation: shapes, keys)."""


class UnsafePickleError(pickle.UnpicklingError):
    """A pickle referenced a global outside the allow-list (nothing was called)."""


class RestrictedUnpickler(pickle.Unpickler):
    """Unpickles `.metadata`: only `METADATA_GLOBALS` and torch dtypes can be looked up."""

    def find_class(self, module: str, name: str):
        if (module, name) in METADATA_GLOBALS or (module == "torch" and isinstance(vars(torch).get(name),
                                                                                    torch.dtype)):
            return super().find_class(module, name)
        raise UnsafePickleError(f"{module}.{name}")

    def persistent_load(self, pid):
        raise UnsafePickleError(f"persistent id {pid!r}")


def _first_line(e: Exception) -> str:
    lines = [line for line in str(e).splitlines() if line.strip()]
    return f"{type(e).__name__}: {lines[0] if lines else ''}"


def _refused(path: str, what: str) -> CheckpointError:
    return CheckpointError(f"{path}: refused to load: it references {what}, which is not part of the checkpoint "
                           "format (nothing in it was run; the file was altered or is not a checkpoint)")


def read_metadata(checkpoint_dir: str) -> Metadata:
    """The distributed checkpoint's `.metadata`, read by the restricted unpickler."""
    path = os.path.join(checkpoint_dir, METADATA_FILE)
    try:
        with open(path, "rb") as f:
            metadata = RestrictedUnpickler(f).load()
    except FileNotFoundError:
        raise CheckpointError(f"{path}: missing (the checkpoint is incomplete)") from None
    except UnsafePickleError as e:
        raise _refused(path, str(e)) from None
    except Exception as e:  # EOFError, UnpicklingError, ...: a truncated or overwritten file
        raise CheckpointError(f"{path}: unreadable, truncated or corrupt ({_first_line(e)})") from None
    if not isinstance(metadata, Metadata):
        raise CheckpointError(f"{path}: holds a {type(metadata).__name__}, not checkpoint metadata")
    return metadata


def check_files(checkpoint_dir: str, metadata: Metadata) -> None:
    """Every data file the metadata names exists and holds all its items (a missing or cut shard, named)."""
    needed: dict[str, int] = {}
    for info in (metadata.storage_data or {}).values():
        needed[info.relative_path] = max(needed.get(info.relative_path, 0), info.offset + info.length)
    root = os.path.realpath(checkpoint_dir)
    for rel, end in sorted(needed.items()):
        path = os.path.join(checkpoint_dir, rel)
        if os.path.dirname(os.path.realpath(path)) != root:  # PyTorch would read whatever file it names
            raise CheckpointError(f"{os.path.join(checkpoint_dir, METADATA_FILE)}: names a data file outside the "
                                  f"checkpoint folder ({rel!r}); refused")
        if not os.path.isfile(path):
            raise CheckpointError(f"{path}: missing (the checkpoint's metadata lists it)")
        size = os.path.getsize(path)
        if size < end:
            raise CheckpointError(f"{path}: truncated ({size} bytes; the checkpoint's metadata needs {end})")


def safe_torch_load(source, path: str):
    """`torch.load(weights_only=True)` (numpy RNG-state globals added); errors name `path`."""
    try:
        with torch.serialization.safe_globals(NUMPY_RNG_GLOBALS):
            return torch.load(source, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise CheckpointError(f"{path}: missing (the checkpoint is incomplete)") from None
    except pickle.UnpicklingError as e:
        found = _REFUSED.search(str(e))
        if found:
            raise _refused(path, found.group(1)) from None
        reason = [line for line in str(e).splitlines() if line.strip()][-2:][0]  # torch's own line, not its preface
        raise CheckpointError(f"{path}: refused to load: {reason}") from None
    except Exception as e:  # RuntimeError from the zip reader, EOFError, ...
        raise CheckpointError(f"{path}: unreadable, truncated or corrupt ({_first_line(e)})") from None


class SafeFileSystemReader(CachedMetadataFileSystemReader):
    """PyTorch's file reader with `.metadata` read by the restricted unpickler and the files checked."""

    def read_metadata(self, *args, **kwargs) -> Metadata:
        if kwargs.get("rank") is not None:  # per-rank metadata: not a format this project writes
            raise CheckpointError(f"{self.path}: no global {METADATA_FILE}")
        if self._cached_metadata is None:
            metadata = read_metadata(str(self.path))
            check_files(str(self.path), metadata)
            if getattr(metadata, "storage_meta", None) is None:
                metadata.storage_meta = StorageMeta()
            metadata.storage_meta.load_id = self.load_id
            self._cached_metadata = metadata
        return self._cached_metadata


class SafeLoadPlanner(mcore_torch.MCoreLoadPlanner):
    """Megatron-Core's load planner with byte items loaded weights-only (PyTorch's loads them with pickle)."""

    checkpoint_dir = ""

    def load_bytes(self, read_item, value: io.BytesIO) -> None:
        info = self.metadata.storage_data.get(read_item.storage_index)
        where = os.path.join(self.checkpoint_dir, info.relative_path) if info else self.checkpoint_dir
        obj = safe_torch_load(value, f"{where} (item {read_item.dest_index.fqn})")
        if self.flatten_state_dict:
            set_element(self.original_state_dict, self.mappings[read_item.dest_index.fqn], obj)
        else:
            self.state_dict[read_item.dest_index.fqn] = obj


@contextlib.contextmanager
def _safe_dcp(checkpoint_dir: str):
    """Megatron-Core's torch_dist strategy with our reader and planner for one call.

    Its `load` builds the reader and planner itself (module-level `_get_filesystem_reader` and
    `MCoreLoadPlanner`), with no parameter for either; the two names are swapped for the duration of
    the call and restored after. The metadata is read (and checked) here, before PyTorch's wrappers,
    which would turn a named error into a multi-line `CheckpointException`."""
    reader = SafeFileSystemReader(checkpoint_dir)
    reader.read_metadata()
    planner = type("SafeLoadPlannerAt", (SafeLoadPlanner,), {"checkpoint_dir": str(checkpoint_dir)})
    saved = mcore_torch._get_filesystem_reader, mcore_torch.MCoreLoadPlanner
    mcore_torch._get_filesystem_reader = lambda path, cache_metadata=False: reader
    mcore_torch.MCoreLoadPlanner = planner
    try:
        yield
    finally:
        mcore_torch._get_filesystem_reader, mcore_torch.MCoreLoadPlanner = saved


class SafeShardedLoadStrategy(mcore_torch.TorchDistLoadShardedStrategy):
    """torch_dist loading through `SafeFileSystemReader` and `SafeLoadPlanner`."""

    def load(self, sharded_state_dict, checkpoint_dir):
        with _safe_dcp(checkpoint_dir):
            return super().load(sharded_state_dict, checkpoint_dir)

    def load_tensors_metadata(self, checkpoint_dir, metadata=None):
        with _safe_dcp(checkpoint_dir):
            return super().load_tensors_metadata(checkpoint_dir, metadata)

    def load_sharded_metadata(self, checkpoint_dir):
        with _safe_dcp(checkpoint_dir):
            return super().load_sharded_metadata(checkpoint_dir)


class SafeCommonLoadStrategy(TorchCommonLoadStrategy):
    """`common.pt` loaded weights-only, whatever the environment says."""

    def load_common(self, checkpoint_dir):
        path = os.path.join(checkpoint_dir, COMMON_STATE_FNAME)
        return safe_torch_load(path, path)

    def load_sharded_objects(self, sharded_objects_state_dict, checkpoint_dir):
        raise CheckpointError(f"{checkpoint_dir}: sharded objects in separate files are not a format this "
                              "project reads (torch_dist checkpoints keep them inside the .distcp files)")


FORMAT = {"sharded_backend": "torch_dist", "common_backend": "torch"}
"""The only `dist_checkpointing` format read here (what the trainer and the converter write)."""


def _check_dir(checkpoint_dir: str) -> None:
    """A checkpoint folder whose metadata.json names the torch_dist format (else Megatron would pick
    another reader by what the file says)."""
    if not os.path.isdir(checkpoint_dir):
        raise CheckpointError(f"{checkpoint_dir}: no such checkpoint folder")
    path = os.path.join(checkpoint_dir, "metadata.json")
    try:
        with open(path) as f:
            config = json.load(f)
    except FileNotFoundError:
        raise CheckpointError(f"{checkpoint_dir}: not a checkpoint (no metadata.json)") from None
    except ValueError as e:
        raise CheckpointError(f"{path}: not valid JSON ({e})") from None
    found = {k: config.get(k) for k in FORMAT} if isinstance(config, dict) else {}
    if found != FORMAT:
        raise CheckpointError(f"{path}: format {found}, expected {FORMAT}")


def _unwrapped(e: CheckpointException) -> BaseException:
    """What failed inside PyTorch's `CheckpointException` (it wraps every rank's failure with its traceback):
    our `CheckpointError` if a rank raised one, else the first failure."""
    failures = [inner for inner, _traceback in e.failures.values()]
    return next((f for f in failures if isinstance(f, CheckpointError)), failures[0] if failures else e)


def load(sharded_state_dict: dict, checkpoint_dir: str, **kwargs) -> dict:
    """`dist_checkpointing.load` through the safe strategies (`kwargs` as there). Any failure of the read
    (ours, PyTorch's wrapped one, Megatron's checks such as a global shape mismatch) is one `CheckpointError`
    line naming the checkpoint; the original stays attached as its cause."""
    _check_dir(checkpoint_dir)
    try:
        return dist_checkpointing.load(sharded_state_dict, checkpoint_dir, sharded_strategy=SafeShardedLoadStrategy(),
                                       common_strategy=SafeCommonLoadStrategy(), **kwargs)
    except CheckpointException as e:
        inner = _unwrapped(e)
        if isinstance(inner, CheckpointError):
            raise inner from None
        kind = CheckpointMismatchError if isinstance(inner, CheckpointingException) else CheckpointError
        raise kind(f"{checkpoint_dir}: cannot be loaded ({_first_line(inner)})") from e
    except CheckpointingException as e:
        raise CheckpointMismatchError(f"{checkpoint_dir}: cannot be loaded ({_first_line(e)})") from e


def load_common_state_dict(checkpoint_dir: str) -> dict:
    """The checkpoint's common (non-sharded) state, weights-only."""
    _check_dir(checkpoint_dir)
    return SafeCommonLoadStrategy().load_common(checkpoint_dir)


def verify(checkpoint_dir: str) -> None:
    """A structural check without loading tensors: metadata readable and safe, every shard present and
    long enough, common state readable. Raises `CheckpointError`."""
    _check_dir(checkpoint_dir)
    check_files(checkpoint_dir, read_metadata(checkpoint_dir))
    load_common_state_dict(checkpoint_dir)
