"""The kernels a function launches, as comparable records: what a CUDA graph would capture, checked on a CPU.

Why: a CUDA graph replays the kernels of one captured call with the arguments of that call. It is correct
only if every later call would launch the same operators, with the same shapes, the same Python scalars
and the same long-lived buffers (weights, KV cache, input buffers), only the buffers' contents changing.
CI has no GPU, so the property is checked directly: `OpTrace` records each ATen operator a call dispatches
with its non-tensor arguments, every tensor's shape/stride/dtype, and where the tensor comes from:
a `persistent` storage (which one, at which offset), an earlier operator of the same call (a temporary),
or neither (a *foreign* tensor: made from host data, such as `torch.tensor([start])`; recorded with its
values, so a per-step value shows up as a difference). Two calls that would replay one graph give equal
records.
"""

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_map


def storage_key(t: torch.Tensor) -> int:
    return t.untyped_storage().data_ptr()


class OpTrace(TorchDispatchMode):
    """Records `(operator, arguments)` for every operator dispatched inside `with OpTrace(persistent):`.

    `persistent`: storage addresses (`storage_key`) of the tensors that outlive a call (a graph reads them
    in place); a tensor argument there is recorded with its address, any other as a temporary."""

    def __init__(self, persistent: set[int]):
        super().__init__()
        self.persistent = persistent
        self.produced: set[int] = set()
        self.ops: list[tuple] = []
        self.foreign = 0
        """Operator arguments that were neither persistent nor made by an earlier operator of the call."""
        self.host_reads = 0
        """Values read back to the host (`.item()`, `int(t)`, `.tolist()`): a CUDA graph cannot capture them."""

    def _describe(self, x):
        if isinstance(x, torch.Tensor):
            key = storage_key(x)
            if key in self.persistent:
                where = ("persistent", key, x.storage_offset())
            elif key in self.produced:
                where = ("temporary",)
            else:
                self.foreign += 1
                where = ("foreign", tuple(x.flatten().tolist()) if x.numel() <= 64 else x.numel())
            return ("tensor", tuple(x.shape), x.stride(), str(x.dtype), str(x.device)) + where
        if isinstance(x, (int, float, bool, str, type(None), torch.dtype, torch.device, torch.memory_format,
                          torch.layout)):
            return repr(x)
        return type(x).__name__

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        self.ops.append((str(func), tree_map(self._describe, args), tree_map(self._describe, kwargs)))
        if func is torch.ops.aten._local_scalar_dense.default:
            self.host_reads += 1
        out = func(*args, **kwargs)
        tree_map(lambda t: self.produced.add(storage_key(t)) if isinstance(t, torch.Tensor) else None, out)
        return out


def first_difference(a: list[tuple], b: list[tuple]) -> str:
    """Where two traces part (for an assertion message)."""
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return f"op {i}: {x} != {y}"
    return f"lengths {len(a)} != {len(b)}" if len(a) != len(b) else "equal"
