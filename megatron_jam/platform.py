"""Megatron-Core on CPU: the small layer that lets its CUDA-only paths run on gloo.

Why: Megatron-Core 0.16.1's pipeline schedules, p2p layer, tensor-parallel
mappings, gradient clipping and RNG tracker allocate with `device="cuda"` or
`torch.cuda.current_device()`, call `torch.cuda.synchronize()`, and keep the
"model-parallel" RNG state with `torch.cuda.get_rng_state()`. Without a GPU
they raise. Tests and laptop runs should still take exactly the code path of
a GPU cluster (`get_forward_backward_func`, `ColumnParallelLinear`,
`dist_checkpointing`, ...), so instead of forking those functions we:

1. wrap torch's tensor factories (`torch.empty`, `torch.zeros`, ...,
   `Tensor.new_*`, `Tensor.to`) so that a CUDA device argument (`"cuda"`,
   `"cuda:N"`, an int index, `torch.device("cuda")`) becomes the CPU, and
   make `Tensor.cuda()` return the tensor itself. (A `TorchFunctionMode` is
   not enough: torch pops the mode while its handler runs, so everything
   inside `torch.autograd.backward`, such as the sequence-parallel backward
   of Megatron's linears, would run without it.)
2. make `torch.cuda.current_device()` return 0 and `torch.cuda.synchronize()`
   a no-op (both raise on CPU-only builds);
3. replace the RNG tracker with one whose "device" generator is the CPU
   default generator, which is what dropout and init on CPU tensors use;
4. replace the optimizer's gradient clipping, whose only CUDA dependence is
   an assertion that gradients are `torch.cuda.FloatTensor`;
5. let the distributed optimizer sort its parameters by type with CPU
   tensors named as CUDA ones (its only CUDA dependence on gloo, which has
   the reduce-scatter and all-gather it uses, asynchronous ones included).

`install()` (run by `import megatron_jam`) does all of it once and is a no-op
when CUDA is available, so a GPU cluster runs unmodified Megatron-Core. It
patches torch and Megatron-Core as they are imported (an import hook), so
that tools which need neither (`--help`, text preprocessing, inspection)
start at once; it also filters the known, non-actionable start-up warnings
(`KNOWN_WARNINGS`, the one place they are listed) before Megatron-Core is
imported and says instead, in one log line, which kernels run. Every wrapper only rewrites CUDA
devices, which cannot work on a CPU-only machine anyway. Note that importing
`megatron_jam` applies it to the whole process: code that probes for CUDA by
allocating on "cuda" (instead of `torch.cuda.is_available()`) is misled. The layer was checked
against `MEGATRON_CORE_VERSION`; `tests/test_platform.py` fails loudly when an
upgrade breaks any of the patched entry points.
"""

import contextlib
import functools
import importlib.abc
import importlib.metadata
import importlib.util
import sys
import warnings
from typing import Any

# Bound by `_bind_torch` once torch is imported: `import megatron_jam` must not import torch (2-3 s)
# or Megatron-Core (5 s), so that `--help` and the data tools start at once.
torch = None

MEGATRON_CORE_VERSION = "0.16.1"

_INSTALLED = False

# Functions that take a `device=`; Megatron-Core calls several with a CUDA device.
_FACTORIES = ("empty", "zeros", "ones", "full", "tensor", "as_tensor", "arange", "rand", "randn",
              "randint", "randperm", "eye", "linspace", "empty_like", "zeros_like", "ones_like",
              "full_like", "rand_like", "randn_like", "empty_strided")
_TENSOR_NEW = ("new_empty", "new_zeros", "new_ones", "new_full", "new_tensor")


def cpu_mode_active() -> bool:
    """True when the CPU layer is installed (no CUDA on this machine)."""
    return _INSTALLED


def _is_cuda_device(device: Any) -> bool:
    if isinstance(device, torch.device):
        return device.type == "cuda"
    if isinstance(device, str):
        return device.startswith("cuda")
    # A bare int is a CUDA ordinal in torch's device conventions (bools are not devices).
    return isinstance(device, int) and not isinstance(device, bool)


def _cpu_device_kwarg(fn):
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        if "device" in kwargs and _is_cuda_device(kwargs["device"]):
            kwargs["device"] = "cpu"
        return fn(*args, **kwargs)

    wrapper.__jam_cpu_patch__ = True
    return wrapper


def _cpu_tensor_to(to):
    @functools.wraps(to)
    def wrapper(self, *args, **kwargs):
        if args and _is_cuda_device(args[0]):  # Tensor.to(device, ...)
            args = ("cpu",) + args[1:]
        if "device" in kwargs and _is_cuda_device(kwargs["device"]):
            kwargs["device"] = "cpu"
        return to(self, *args, **kwargs)

    wrapper.__jam_cpu_patch__ = True
    return wrapper


def _bind_torch() -> None:
    global torch
    import torch  # noqa: F811  (binds the module-level name)


def _patch_devices() -> None:
    # torch's default-device mode (`with torch.device("meta"):`, used by transformers'
    # from_pretrained) recognises factories by identity in a set it builds on first use;
    # build it now, from the original functions our wrappers call.
    from torch.utils._device import _device_constructors

    _device_constructors()
    for name in _FACTORIES:
        setattr(torch, name, _cpu_device_kwarg(getattr(torch, name)))
    for name in _TENSOR_NEW:
        setattr(torch.Tensor, name, _cpu_device_kwarg(getattr(torch.Tensor, name)))
    torch.Tensor.to = _cpu_tensor_to(torch.Tensor.to)
    torch.Tensor.cuda = lambda self, *args, **kwargs: self
    torch.cuda.current_device = lambda: 0
    torch.cuda.synchronize = lambda device=None: None


def _cpu_get_rng_state(device: Any = "cuda", clone: bool = False, graph_safe: bool = False):
    return torch.get_rng_state()


def _cpu_set_rng_state(new_state: "torch.Tensor", device: int = -1, graph_safe: bool = False):
    torch.set_rng_state(new_state)


def _make_cpu_tracker_class():
    from megatron.core.tensor_parallel import random as mrandom

    class CpuRNGStatesTracker(mrandom.CudaRNGStatesTracker):
        """Megatron's RNG tracker with the CPU default generator as the device generator.

        `add` and `fork` keep Megatron's semantics (named states, restored on exit);
        only the generator differs, and the CPU-state-changed warning of the CUDA
        version is meaningless here because both generators are the same one.
        """

        def add(self, name, seed):
            self._is_initialized = True
            if seed in self.seeds_:
                raise Exception(f"seed {seed} already exists")
            self.seeds_.add(seed)
            if name in self.states_:
                raise Exception(f"rng state {name} already exists")
            orig = torch.get_rng_state()
            torch.manual_seed(seed)
            self.states_[name] = torch.get_rng_state()
            torch.set_rng_state(orig)

        @contextlib.contextmanager
        def fork(self, name=mrandom._MODEL_PARALLEL_RNG_TRACKER_NAME):
            if name not in self.states_:
                raise Exception(f"rng state {name} is not added")
            orig = torch.get_rng_state()
            orig_name = self._current_state_name
            if orig_name != "default-rng":
                self.states_[orig_name] = orig
            torch.set_rng_state(self.states_[name])
            self._current_state_name = name
            try:
                yield
            finally:
                self.states_[name] = torch.get_rng_state()
                if orig_name != "default-rng":
                    orig = self.states_[orig_name]
                torch.set_rng_state(orig)
                self._current_state_name = orig_name

    return CpuRNGStatesTracker


def _cpu_clip_grad_by_total_norm_fp32(parameters, max_norm, total_norm, use_decoupled_grad=False):
    """Megatron's `clip_grad_by_total_norm_fp32` minus its `torch.cuda.FloatTensor` assertion:
    the same coefficient, max_norm / (total_norm + 1e-6), applied in place when below 1."""
    if isinstance(parameters, torch.Tensor):
        parameters = [parameters]
    attr = "decoupled_grad" if use_decoupled_grad else "grad"
    grads = [getattr(p, attr).detach() for p in parameters if getattr(p, attr, None) is not None]
    clip_coeff = max_norm / (total_norm + 1.0e-6)
    if clip_coeff < 1.0 and grads:
        torch._foreach_mul_(grads, clip_coeff)


def _patch_optimizer() -> None:
    from megatron.core.optimizer import clip_grads, optimizer

    clip_grads.clip_grad_by_total_norm_fp32 = _cpu_clip_grad_by_total_norm_fp32
    optimizer.clip_grad_by_total_norm_fp32 = _cpu_clip_grad_by_total_norm_fp32


@contextlib.contextmanager
def _cpu_tensors_typed_as_cuda():
    """While active, `Tensor.type()` without arguments names a CPU tensor's CUDA type ("torch.FloatTensor"
    reads "torch.cuda.FloatTensor"); `Tensor.type(dtype)` conversions are untouched. Process-wide while it
    lasts: use it only around single-threaded set-up code."""
    original = torch.Tensor.type

    def cuda_named(self, dtype=None, non_blocking=False, **kwargs):
        if dtype is None and not kwargs and self.device.type == "cpu":
            return original(self).replace("torch.", "torch.cuda.", 1)
        return original(self, dtype, non_blocking, **kwargs)

    torch.Tensor.type = cuda_named
    try:
        yield
    finally:
        torch.Tensor.type = original


def _patch_distributed_optimizer() -> None:
    """`DistributedOptimizer._build_model_and_main_param_groups` sorts parameters into fp32 and 16-bit groups
    by `param.type()` against CUDA type names ("torch.cuda.FloatTensor", ...) and raises a TypeError for
    anything else, CPU tensors included. Everything else the distributed optimizer does runs on gloo as is
    (reduce-scatter of the gradient buckets, all-gather of the updated parameters, with or without
    `async_op`; CUDA streams only with several optimizer instances, which the trainer does not create;
    device arguments go through `_patch_devices`), so the sorting runs with CPU tensors typed as CUDA."""
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    build = DistributedOptimizer._build_model_and_main_param_groups.__func__

    @functools.wraps(build)
    def cpu_build(cls, *args, **kwargs):
        with _cpu_tensors_typed_as_cuda():
            return build(cls, *args, **kwargs)

    cpu_build.__jam_cpu_patch__ = True
    DistributedOptimizer._build_model_and_main_param_groups = classmethod(cpu_build)


def check_megatron_core_version() -> str:
    """The installed Megatron-Core version; raises if it is not the one this layer was checked on."""
    found = importlib.metadata.version("megatron-core")
    if found != MEGATRON_CORE_VERSION:
        raise RuntimeError(
            f"megatron-jam's CPU layer (megatron_jam/platform.py) was checked against "
            f"megatron-core=={MEGATRON_CORE_VERSION}, found {found}. Re-run tests/test_platform.py "
            f"and the equivalence tests before relying on CPU runs."
        )
    return found


def _patch_rng() -> None:
    from megatron.core.tensor_parallel import random as mrandom

    mrandom._get_cuda_rng_state = _cpu_get_rng_state
    mrandom._set_cuda_rng_state = _cpu_set_rng_state
    mrandom.CudaRNGStatesTracker = _make_cpu_tracker_class()
    mrandom.initialize_rng_tracker(force_reset=True)


def _warn_on_other_version() -> None:
    """One warning when the installed Megatron-Core is not the version this layer was checked on."""
    import warnings

    try:
        check_megatron_core_version()
    except (RuntimeError, importlib.metadata.PackageNotFoundError) as e:
        warnings.warn(str(e), RuntimeWarning, stacklevel=3)


# ------------------------------------------------------------------ quiet start-up
# (category, message regex) of the start-up warnings every CPU or GPU-without-TE run prints, none of them
# actionable: Megatron-Core's fallbacks when Transformer Engine / Apex are absent (summarised instead in
# one log line, `_log_backends`), a deprecation Megatron-Core triggers with its own default, and torch
# deprecations inside Megatron-Core's checkpointing and distributed optimizer. Matched by text (and, where
# the text alone could match a user's own code, by the Megatron-Core module that warns), so any other warning
# still shows. Entries: (category, message regex) or (category, message regex, module regex).
KNOWN_WARNINGS = (
    (UserWarning, r"Transformer Engine and Apex are not installed\. Falling back to "),
    (UserWarning, r"Apex is not installed\. Falling back to Torch Norm"),
    (UserWarning, r"full scope is deprecated\. Use empty cuda_graph_scope"),  # TransformerConfig's default
    (FutureWarning, r"Please use DTensor instead and we are deprecating ShardedTensor"),
    (FutureWarning, r"`load_state_dict` is deprecated and will be removed"),  # Megatron-Core's torch_dist load
    (DeprecationWarning, r"`torch\.jit\.script_method` is deprecated"),
    # the distributed optimizer's gradient reduce-scatter and parameter all-gather (names torch 2.13 deprecates)
    (FutureWarning, r"`torch\.distributed\.(reduce_scatter_tensor|all_gather_into_tensor)` is deprecated"),
    # fp32 distributed optimizer: `zero_grad` looks at the `.grad` of its parameter shards, which are views of
    # the model's parameters (its own comment: "throws grad-access warning")
    (UserWarning, r"The \.grad attribute of a Tensor that is not a leaf Tensor is being accessed",
     r"megatron\.core\.optimizer\.optimizer"),
)

BACKENDS_LINE = "%s not installed: local kernels (PyTorch SDPA attention, torch norms and Adam)"
APEX_LINE = "Apex not installed: Transformer Engine or torch kernels in its place"


def quiet_known_warnings() -> None:
    """Filter `KNOWN_WARNINGS` (once; precise message filters, no category-wide ignore)."""
    for category, message, *module in KNOWN_WARNINGS:
        warnings.filterwarnings("ignore", message=message, category=category, module=module[0] if module else "")


def _missing_backends() -> list[str]:
    found = {name: importlib.util.find_spec(module) is not None
             for name, module in (("Transformer Engine", "transformer_engine"), ("Apex", "apex"))}
    return [name for name, ok in found.items() if not ok]


def _log_backends() -> None:
    """The one line that replaces Megatron-Core's fallback warnings: rank 0 of the launched processes only
    (not again in the checkpoint writers Megatron-Core spawns, which import Megatron-Core anew)."""
    import multiprocessing

    missing = _missing_backends()
    if missing and multiprocessing.parent_process() is None:
        from megatron_jam.utils.logging import get_logger, log_rank0

        line = APEX_LINE if missing == ["Apex"] else BACKENDS_LINE % " and ".join(missing)
        log_rank0(get_logger(__name__), "%s", line)


# ------------------------------------------------------------------ installation
def _on_torch(module) -> None:
    global _INSTALLED
    _bind_torch()
    if not _INSTALLED and not torch.cuda.is_available():  # not twice (importlib.reload): no wrapped wrappers
        _patch_devices()
        _INSTALLED = True


def _on_megatron_core(module) -> None:
    _warn_on_other_version()
    _log_backends()


# Module -> what to do once it is imported (in this order when several are already imported).
_HOOKS = {
    "torch": _on_torch,
    "megatron.core": _on_megatron_core,
    "megatron.core.tensor_parallel.random": lambda module: _INSTALLED and _patch_rng(),
    "megatron.core.optimizer.optimizer": lambda module: _INSTALLED and _patch_optimizer(),
    "megatron.core.optimizer.distrib_optimizer": lambda module: _INSTALLED and _patch_distributed_optimizer(),
}


class _AfterImport(importlib.abc.MetaPathFinder):
    """Runs a `_HOOKS` entry right after its module has executed, before any importer sees it: the patches
    are in place exactly as if they had been applied eagerly, but only processes that import torch /
    Megatron-Core pay for importing them."""

    def find_spec(self, name, path, target=None):
        if name not in _HOOKS:
            return None
        spec = next((s for f in sys.meta_path if f is not self and hasattr(f, "find_spec")
                     for s in [f.find_spec(name, path, target)] if s is not None), None)
        if spec is not None and spec.loader is not None and hasattr(spec.loader, "exec_module"):
            spec.loader.exec_module = self._then_hook(spec.loader.exec_module, name)
        return spec

    @staticmethod
    def _then_hook(exec_module, name):
        def run(module):
            exec_module(module)
            _HOOKS[name](module)

        return run


def install() -> bool:
    """Quiet the known start-up warnings now, before Megatron-Core is imported, and install the CPU layer
    (if CUDA is absent) as torch and Megatron-Core are imported: at once for modules already imported, else
    by an import hook. Returns whether the device layer is in place yet (idempotent).

    Without Megatron-Core installed at all the package still imports (the data tools need none of it);
    an installed Megatron-Core whose names moved fails with its ImportError when it is imported."""
    if any(isinstance(f, _AfterImport) for f in sys.meta_path):
        return _INSTALLED
    quiet_known_warnings()
    for name, hook in _HOOKS.items():
        if name in sys.modules:
            hook(sys.modules[name])
    sys.meta_path.insert(0, _AfterImport())
    return _INSTALLED
