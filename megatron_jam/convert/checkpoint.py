"""Writing a converted model as a Megatron-Core `dist_checkpointing` checkpoint, and loading one.

Why dist_checkpointing: the trainer, evaluator and generator load it at any
TP/PP (the checkpoint stores global tensors with their shard metadata), so
the converter never needs the target layout. The writer builds the target
model once at TP=1 in this process, copies converted parts into it as they
stream in (the parents are never whole in memory), saves, and writes
`model_config.json` (what every tool reads), `conversion.json` (method,
sources, vocabulary rules, the HF config for export) and
`hf_extra.safetensors` (HF tensors Megatron has no place for). Everything is
written under `<save>.tmp-<pid>` and renamed at the end: a failed run leaves
no folder that looks like a checkpoint.
"""

import json
import os
import shutil

import torch
import torch.distributed as dist
from torch import Tensor

from megatron_jam.convert.common import EMB, HF_EXTRA, OUT, ConvertError
from megatron_jam.models.jam_gpt import MODEL_CONFIG_FILE, model_class
from megatron_jam.utils.logging import get_logger

logger = get_logger(__name__)

CONVERSION_FILE = "conversion.json"
HF_EXTRA_FILE = "hf_extra.safetensors"
PADDED_ROWS = (EMB, OUT)


def ensure_single_rank(seed: int = 1234) -> None:
    """A one-process gloo world at TP=1, PP=1 (reuses an existing one-rank world)."""
    from megatron_jam.parallel.initialize import initialize_model_parallel
    from megatron_jam.testing.distributed import _free_port

    if not dist.is_initialized():
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{_free_port()}", rank=0, world_size=1)
    if dist.get_world_size() != 1:
        raise ConvertError(f"conversion runs in one process; this world has {dist.get_world_size()} ranks")
    initialize_model_parallel(1, 1, seed=seed)


def build_single(cfg, bf16: bool = False, initialize: bool = True):
    """The whole model (TP=1, PP=1, this process)."""
    from megatron_jam.parallel.model import build_model_chunks, parallel_kwargs

    kw = parallel_kwargs(bf16=bf16, perform_initialization=initialize)
    return build_model_chunks(model_class(cfg), cfg, kw, wrap_ddp=False)[0]


class CheckpointWriter:
    """Context manager: `write(part)` any number of times, then `finish(record)`; removes everything on error."""

    def __init__(self, cfg, save: str, bf16: bool = False, keep_init: tuple[str, ...] = ()):
        if os.path.exists(save) and os.listdir(save):
            raise ConvertError(f"--save {save} exists and is not empty; choose a new folder")
        self.cfg, self.save, self.keep_init = cfg, save, keep_init
        self.tmp = f"{save.rstrip('/')}.tmp-{os.getpid()}"
        self.model = build_single(cfg, bf16=bf16, initialize=bool(keep_init))
        self.targets = {k: v for k, v in self.model.state_dict().items() if isinstance(v, Tensor)}
        self.written: set[str] = set()
        self.extra: dict[str, Tensor] = {}

    def __enter__(self) -> "CheckpointWriter":
        shutil.rmtree(self.tmp, ignore_errors=True)
        os.makedirs(self.tmp)
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)

    @torch.no_grad()
    def write(self, part: dict[str, Tensor]) -> None:
        """Copy converted tensors into the model (vocabulary rows padded with zeros)."""
        for k, t in part.items():
            if k.startswith(HF_EXTRA):
                self.extra[k] = t.contiguous()
                continue
            if k not in self.targets:
                raise ConvertError(f"converted tensor {k} has no place in the {type(self.model).__name__}")
            dst = self.targets[k]
            if k in PADDED_ROWS and t.shape[0] <= dst.shape[0] and t.shape[1:] == dst.shape[1:]:
                dst[: t.shape[0]].copy_(t)
                dst[t.shape[0]:].zero_()
            elif t.shape != dst.shape:
                raise ConvertError(f"tensor {k}: converted shape {tuple(t.shape)} != model shape {tuple(dst.shape)}")
            else:
                dst.copy_(t)
            self.written.add(k)

    def finish(self, record: dict) -> str:
        """Check every tensor was written, save, publish; returns the checkpoint folder."""
        from megatron.core import dist_checkpointing
        from safetensors.torch import save_file

        unwritten = sorted(k for k in self.targets if k not in self.written and not k.startswith(self.keep_init))
        if unwritten:
            raise ConvertError(f"no converted tensor for {unwritten[:5]} ({len(unwritten)} in all)")
        dist_checkpointing.save(self.model.sharded_state_dict(), self.tmp)
        self.cfg.to_json(os.path.join(self.tmp, MODEL_CONFIG_FILE))
        with open(os.path.join(self.tmp, CONVERSION_FILE), "w") as f:
            json.dump(record, f, indent=2, sort_keys=True)
        if self.extra:
            save_file(self.extra, os.path.join(self.tmp, HF_EXTRA_FILE), metadata={"format": "pt"})
        if os.path.exists(self.save):
            os.rmdir(self.save)  # empty (checked in __init__)
        os.rename(self.tmp, self.save)
        return self.save


def load_checkpoint(chunks: list, path: str) -> None:
    """Load a checkpoint's model weights into this rank's chunks (any TP/PP layout); `path` is a
    converted checkpoint or a training `--save` directory (its latest complete iteration)."""
    from megatron.core import dist_checkpointing

    from megatron_jam.parallel.model import unwrap
    from megatron_jam.training.checkpointing import resolve_checkpoint_dir

    path, _ = resolve_checkpoint_dir(path)
    for chunk in chunks:
        m = unwrap(chunk)
        wanted = m.sharded_state_dict()
        loaded = dist_checkpointing.load(wanted, path)
        # a training checkpoint's common state (optimizer groups, iteration, ...) comes back too
        m.load_state_dict({k: loaded[k] for k in wanted})


def load_state_on_one_rank(path: str, cfg) -> dict[str, Tensor]:
    """The full canonical state dict of a checkpoint (one-rank world, TP=1)."""
    model = build_single(cfg, initialize=False)
    load_checkpoint([model], path)
    return {k: v for k, v in model.state_dict().items() if isinstance(v, Tensor)}


def read_hf_extra(path: str) -> dict[str, Tensor]:
    from safetensors.torch import load_file

    f = os.path.join(path, HF_EXTRA_FILE)
    return load_file(f) if os.path.exists(f) else {}
