"""Megatron-Core `torch_dist` checkpoints written and read one part at a time.

Why: `dist_checkpointing.save` takes a state dict of materialised tensors, and
its torch_dist writer resolves every tensor before it writes a byte, so a
converter built on it holds the whole output model (JAM-Cross: 2x a parent,
JAM-Width: 3.2x). Here the output model is built on the `meta` device: its
sharded state dict gives every key, shape and shard layout that Megatron's
loader expects, at no memory cost. The checkpoint is then written through
PyTorch's `FileSystemWriter` with one thread, one file per part, which asks
the planner for one tensor at a time, in plan order. The planner orders the
plan by *part* (embedding, layer 0, 1, ..., final, new blocks) and computes a
part only when the first of its tensors is asked for, so one part of the
output (and the parents' matching parts) is in memory at a time. The result is the
format Megatron writes (`metadata.json`: torch_dist), loadable at any TP/PP.

Reading is the mirror: `load_parts` fills only the requested tensors of a
meta-built model's sharded state dict.
"""

import dataclasses
import itertools
from collections.abc import Callable, Iterable

import torch
from torch import Tensor

from megatron_jam.convert.common import ConvertError, RowTable, check_finite

Part = int | str | tuple
"""A part of a model: 'embedding', a layer index, 'final', or a tuple naming a new block."""


def meta_sharded_state_dict(model) -> dict:
    """The model's sharded state dict with Megatron's factories applied (SwiGLU fc1 -> two halves)."""
    from megatron.core.dist_checkpointing.mapping import apply_factories

    sd = model.sharded_state_dict()
    apply_factories(sd)
    return sd


def _sharded_tensors(value) -> Iterable:
    from megatron.core.dist_checkpointing.mapping import ShardedTensor

    if isinstance(value, ShardedTensor):
        yield value
    elif isinstance(value, (list, tuple)):
        for v in value:
            yield from _sharded_tensors(v)
    elif isinstance(value, dict):
        for v in value.values():
            yield from _sharded_tensors(v)


@dataclasses.dataclass(frozen=True)
class _Slot:
    """Where one write item's data lives in a canonical tensor (a view: a factory's half, or the whole)."""

    key: str
    shape: tuple
    size: tuple
    stride: tuple
    offset: int
    dtype: torch.dtype


def _slots(sharded: dict, shapes: dict[str, tuple]) -> dict[tuple, _Slot]:
    """(checkpoint key, global offset) -> the canonical tensor and view it is cut from.

    Megatron's factories cut views of the (contiguous) parameter, and meta tensors keep
    size, stride and storage offset, so every saved shard is `as_strided` of its canonical tensor."""
    slots = {}
    for key, value in sharded.items():
        for sh in _sharded_tensors(value):
            slots[(sh.key, tuple(sh.global_offset))] = _Slot(
                key, tuple(shapes[key]), tuple(sh.data.shape), tuple(sh.data.stride()),
                sh.data.storage_offset(), sh.data.dtype)
    return slots


class PartSource:
    """Hands out one output tensor at a time, converting each part once, in the order of `parts`.

    `convert_part(part)` returns canonical tensors; `part_of(key)` says which part makes a key.
    Vocabulary tables (`padded_rows`) may come with fewer rows than the model: the rest are zero.
    Keys starting with `extra_prefix` are kept aside in `extra` (not model tensors)."""

    def __init__(self, parts: list, convert_part: Callable[[Part], dict[str, Tensor]],
                 part_of: Callable[[str], Part], padded_rows: tuple[str, ...] = (), extra_prefix: str = "",
                 model_name: str = "model"):
        self.parts, self.convert_part, self.part_of = parts, convert_part, part_of
        self.rank = {p: i for i, p in enumerate(parts)}
        self.padded_rows, self.extra_prefix, self.model_name = padded_rows, extra_prefix, model_name
        self.current, self.cache, self.used = None, {}, set()
        self.extra: dict[str, Tensor] = {}
        self.done: list = []

    def order(self, key: str) -> int:
        part = self.part_of(key)
        if part not in self.rank:
            raise ConvertError(f"model tensor {key} belongs to part {part!r}, which no converter makes")
        return self.rank[part]

    def tensor(self, slot: _Slot) -> Tensor:
        part = self.part_of(slot.key)
        if part != self.current:
            self._switch(part)
        self.used.add(slot.key)
        full = self._full(slot)
        if slot.size == slot.shape and slot.offset == 0:
            return full
        return torch.as_strided(full, slot.size, slot.stride, slot.offset).clone()

    def close(self) -> None:
        """Check the last part was used up, and that parts the model took nothing from make nothing."""
        for part in [p for p in self.parts if p not in self.done and p != self.current]:
            self._switch(part)
        self._switch(None)

    def _switch(self, part) -> None:
        unused = sorted(set(self.cache) - self.used)
        if unused:
            raise ConvertError(f"converted tensor {unused[0]} has no place in the {self.model_name} "
                               f"({len(unused)} such tensors in part {self.current!r})")
        if self.current is not None:
            self.done.append(self.current)
        if part in self.done:
            raise RuntimeError(f"part {part!r} asked for twice: the plan is not grouped by part")
        self.cache, self.used, self.current = {}, set(), part
        if part is None:
            return
        for k, t in self.convert_part(part).items():
            if self.extra_prefix and k.startswith(self.extra_prefix):
                self.extra[k] = t.contiguous()
            else:
                self.cache[k] = t

    def _full(self, slot: _Slot) -> Tensor:
        if slot.key not in self.cache:
            raise ConvertError(f"no converted tensor for {slot.key} (part {self.current!r} does not make it)")
        t = self.cache[slot.key]
        if slot.key in self.padded_rows and t.shape[0] <= slot.shape[0] and tuple(t.shape[1:]) == slot.shape[1:]:
            if t.shape[0] < slot.shape[0] or not isinstance(t, Tensor):
                padded = torch.zeros(slot.shape, dtype=t.dtype)
                if isinstance(t, Tensor):
                    padded[: t.shape[0]] = t
                else:  # rows still on disk (`readers.Rows`): read straight into the padded table
                    t.read_into(padded)
                t = padded
        elif tuple(t.shape) != slot.shape:
            raise ConvertError(f"tensor {slot.key}: converted shape {tuple(t.shape)} != model shape {slot.shape}")
        t = t.to(slot.dtype).contiguous()
        self.cache[slot.key] = t  # a factory's second half reads the same padded, cast tensor
        return t


def save_streaming(model, path: str, source: PartSource) -> None:
    """Write a meta-device `model` as a torch_dist checkpoint, pulling its data from `source` part by
    part. Errors raised by the source come out as they are (not wrapped by DCP)."""
    from megatron.core import dist_checkpointing
    from torch.distributed.checkpoint.api import CheckpointException

    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items() if isinstance(v, Tensor)}
    sharded = meta_sharded_state_dict(model)
    strategy = _streaming_strategy()(source, _slots(sharded, shapes))
    try:
        dist_checkpointing.save(sharded, path, sharded_strategy=strategy)
    except (Exception, CheckpointException):  # DCP's CheckpointException is a BaseException
        if strategy.error is not None:
            raise strategy.error from None
        raise
    source.close()


def _streaming_strategy():
    """The strategy class (built lazily: importing Megatron's torch strategy pulls in torch.distributed)."""
    from megatron.core.dist_checkpointing.strategies.torch import (
        MCoreSavePlanner,
        TorchDistSaveShardedStrategy,
        _replace_state_dict_keys_with_sharded_keys,
        mcore_to_pyt_state_dict,
    )
    from torch.distributed.checkpoint import FileSystemWriter
    from torch.distributed.checkpoint.filesystem import _StoragePrefix
    from torch.futures import Future
    from torch.distributed.checkpoint import save as dcp_save
    from torch.distributed.checkpoint.planner import WriteItemType

    class LazyPlanner(MCoreSavePlanner):
        """Orders the plan by part and computes each tensor when the writer asks for it."""

        def __init__(self, owner, **kw):
            super().__init__(**kw)
            self.owner = owner

        def create_local_plan(self):
            plan = super().create_local_plan()
            self.plan = dataclasses.replace(plan, items=sorted(plan.items, key=self.owner.item_order))
            return self.plan

        def resolve_data(self, item):
            if item.type == WriteItemType.BYTE_IO:
                return super().resolve_data(item)
            return self.owner.resolve(item)

    class PartFileWriter(FileSystemWriter):
        """One file per part, written in plan order by one thread. (PyTorch's writer keeps every tensor
        of a file referenced until the file is closed, so one file for the whole model would hold it all.)"""

        def __init__(self, path: str, part_rank: Callable):
            super().__init__(path, single_file_per_rank=True, thread_count=1)
            self.part_rank = part_rank

        def write_data(self, plan, planner):
            results = []
            for n, (_, items) in enumerate(itertools.groupby(plan.items, key=self.part_rank)):
                sub = dataclasses.replace(plan, items=list(items),
                                          storage_data=_StoragePrefix(f"{plan.storage_data.prefix}{n}_"))
                results += super().write_data(sub, planner).wait()
            done = Future()
            done.set_result(results)
            return done

    class StreamingSaveStrategy(TorchDistSaveShardedStrategy):
        """torch_dist, written by one thread, one file per part, each tensor made when it is written."""

        def __init__(self, source: PartSource, slots: dict[tuple, _Slot]):
            super().__init__("torch_dist", 1, thread_count=1)
            self.source, self.slots, self.error = source, slots, None

        def _slot(self, item) -> _Slot:
            return self.slots[(item.index.fqn, tuple(item.index.offset))]

        def item_order(self, item) -> tuple:
            if item.type == WriteItemType.BYTE_IO:
                return (-1, 0)
            return (self._keep_error(lambda: self.source.order(self._slot(item).key)), 0)

        def resolve(self, item) -> Tensor:
            return self._keep_error(
                lambda: self.source.tensor(self._slot(item)).reshape(item.tensor_data.chunk.sizes))

        def _keep_error(self, fn):
            try:
                return fn()
            except Exception as e:  # DCP wraps errors per rank; keep ours to re-raise as is
                self.error = e
                raise

        def save(self, sharded_state_dict, checkpoint_dir) -> None:
            sd, _, _ = _replace_state_dict_keys_with_sharded_keys(sharded_state_dict, self.keep_only_main_replica)
            pyt = mcore_to_pyt_state_dict(sd, False)
            writer = PartFileWriter(str(checkpoint_dir), lambda item: self.item_order(item)[0])
            dcp_save(pyt, storage_writer=writer,
                     planner=LazyPlanner(self, dedup_replicated_tensors=False, flatten_state_dict=False))

    return StreamingSaveStrategy


def load_parts(sharded: dict, keys: Iterable[str], path: str) -> dict[str, Tensor]:
    """The canonical tensors `keys` of a checkpoint, read alone (`sharded`: a meta model's sharded state
    dict *before* factories are applied).

    A layer tensor is stored as one slice of a stacked [layers, ...] tensor; Megatron's loader asks for
    every slice a rank holds, so each requested slice is presented as its own shard of the stack
    (`_unprepend`), which PyTorch's reader cuts out of the stored tensor."""
    from megatron.core.dist_checkpointing.mapping import apply_factories

    from megatron_jam.utils import safe_checkpoint

    buffers, views, wanted = {}, {}, {}
    for k in keys:
        entry = sharded[k]
        buffers[k] = torch.empty(entry.data.shape, dtype=entry.data.dtype)
        sub = {k: dataclasses.replace(entry, data=buffers[k])}
        apply_factories(sub)  # SwiGLU fc1 -> its two halves, views of the buffer
        for i, sh in enumerate(_sharded_tensors(sub[k])):
            wanted[f"{k}#{i}"] = _unprepend(sh)
            views[f"{k}#{i}"] = sh.data
    loaded = safe_checkpoint.load(wanted, path, validate_access_integrity=False)  # a subset on purpose
    for name, view in views.items():
        if loaded[name].data_ptr() != view.data_ptr():
            view.copy_(loaded[name].reshape(view.shape))
    for k, t in buffers.items():
        check_finite(t, k, path)
    return buffers


def _unprepend(sh):
    """The same shard with its stacking axes as real (size-1) dimensions of its data."""
    if not sh.prepend_axis_num:
        return sh
    data = sh.data.reshape((1,) * sh.prepend_axis_num + tuple(sh.data.shape))
    return dataclasses.replace(sh, data=data, local_shape=tuple(data.shape), prepend_axis_num=0)


class CheckpointRows(RowTable):
    """Rows [0, rows) of a vocabulary table in a torch_dist checkpoint; `t[i:j]` loads just those rows
    (a row-range shard of the stored table)."""

    def __init__(self, entry, path: str, rows: int):
        self.entry, self.path, self.name = entry, path, entry.key
        self.shape = torch.Size((rows, *entry.local_shape[1:]))
        self.dtype = entry.dtype

    def _read_into(self, out: Tensor, first_row: int) -> None:
        from megatron.core.dist_checkpointing.mapping import ShardedTensor

        from megatron_jam.utils import safe_checkpoint

        shard = ShardedTensor(key=self.entry.key, data=out, dtype=self.dtype, local_shape=tuple(out.shape),
                              global_shape=self.entry.global_shape, global_offset=(first_row, 0),
                              axis_fragmentations=None, replica_id=0)
        loaded = safe_checkpoint.load({"rows": shard}, self.path, validate_access_integrity=False)["rows"]
        if loaded.data_ptr() != out.data_ptr():
            out.copy_(loaded)
