"""Writing a converted model as a Megatron-Core `dist_checkpointing` checkpoint, and loading one.

Why dist_checkpointing: the trainer, evaluator and generator load it at any
TP/PP (the checkpoint stores global tensors with their shard metadata), so
the converter never needs the target layout. The writer builds the target
model on the `meta` device (shapes and shard layout, no memory) and streams
the converted parts into the checkpoint files one part at a time
(`streaming.py`): neither the parents nor the output are ever whole in
memory. It also writes `model_config.json` (what every tool reads),
`conversion.json` (method, sources, vocabulary rules, the HF config for
export) and `hf_extra.safetensors` (HF tensors Megatron has no place for).
Everything is written under `<save>.tmp-<pid>` and renamed at the end: a
failed run leaves no folder that looks like a checkpoint.
"""

import json
import os
import shutil
from collections.abc import Callable

import torch
import torch.distributed as dist
from torch import Tensor

from megatron_jam.convert.common import EMB, HF_EXTRA, OUT, ConvertError, part_of
from megatron_jam.convert.streaming import PartSource, save_streaming
from megatron_jam.models.kinds import MODEL_CONFIG_FILE, model_class
from megatron_jam.utils.logging import get_logger

logger = get_logger(__name__)

CONVERSION_FILE = "conversion.json"
HF_EXTRA_FILE = "hf_extra.safetensors"
PADDED_ROWS = (EMB, OUT)


def ensure_single_rank(seed: int = 1234) -> None:
    """A one-process gloo world at TP=1, PP=1 (reuses an existing one-rank world)."""
    from megatron_jam.parallel.initialize import free_port, initialize_model_parallel

    if not dist.is_initialized():
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    if dist.get_world_size() != 1:
        raise ConvertError(f"conversion runs in one process; this world has {dist.get_world_size()} ranks")
    initialize_model_parallel(1, 1, seed=seed)


def build_single(cfg, bf16: bool = False, initialize: bool = True):
    """The whole model (TP=1, PP=1, this process)."""
    from megatron_jam.parallel.model import build_model_chunks, parallel_kwargs

    kw = parallel_kwargs(bf16=bf16, perform_initialization=initialize)
    return build_model_chunks(model_class(cfg), cfg, kw, wrap_ddp=False)[0]


def build_meta(cfg, bf16: bool = False):
    """The whole model (TP=1, PP=1) on the meta device: every tensor's key, shape, dtype and shard
    layout, no storage."""
    from megatron_jam.parallel.model import parallel_kwargs

    kw = parallel_kwargs(bf16=bf16, perform_initialization=False, use_cpu_initialization=True)
    with torch.device("meta"):
        return model_class(cfg)(cfg, pre_process=True, post_process=True, **kw)


class CheckpointWriter:
    """Context manager: `write(parts, convert_part)` once, then `finish(record)`; removes everything
    on error. `convert_part(part)` returns the canonical tensors of one part (see `common.part_of`)."""

    def __init__(self, cfg, save: str, bf16: bool = False):
        if os.path.exists(save) and not os.path.isdir(save):
            raise ConvertError(f"--save {save} is a file, not a folder")
        if os.path.exists(save) and os.listdir(save):
            raise ConvertError(f"--save {save} exists and is not empty; choose a new folder")
        self.cfg, self.save = cfg, save
        self.tmp = f"{save.rstrip('/')}.tmp-{os.getpid()}"
        self.model = build_meta(cfg, bf16=bf16)
        self.extra: dict[str, Tensor] = {}

    def __enter__(self) -> "CheckpointWriter":
        shutil.rmtree(self.tmp, ignore_errors=True)
        os.makedirs(self.tmp)
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)

    def write(self, parts: list, convert_part: Callable[..., dict[str, Tensor]]) -> None:
        """Stream every part into the checkpoint; a model tensor no part makes, a converted tensor
        the model has no place for, or a shape mismatch is a `ConvertError` naming the tensor."""
        source = PartSource(parts, convert_part, part_of, padded_rows=PADDED_ROWS, extra_prefix=HF_EXTRA,
                            model_name=type(self.model).__name__)
        save_streaming(self.model, self.tmp, source)
        self.extra = source.extra

    def finish(self, record: dict) -> str:
        """Write the config files, publish; returns the checkpoint folder."""
        from safetensors.torch import save_file

        self.cfg.to_json(os.path.join(self.tmp, MODEL_CONFIG_FILE))
        with open(os.path.join(self.tmp, CONVERSION_FILE), "w") as f:
            json.dump(record, f, indent=2, sort_keys=True)
        if self.extra:
            save_file(self.extra, os.path.join(self.tmp, HF_EXTRA_FILE), metadata={"format": "pt"})
        if os.path.exists(self.save):
            os.rmdir(self.save)  # empty (checked in __init__)
        os.rename(self.tmp, self.save)
        return self.save


def load_checkpoint(chunks: list, path: str, iteration: int | None = None) -> None:
    """Load a checkpoint's model weights into this rank's chunks (any TP/PP layout); `path` is a
    converted checkpoint or a training `--save` directory (its latest complete iteration, or `iteration`:
    `--ckpt-step`). The trainer's loader with `--finetune` semantics: one model-only loading path for
    every tool."""
    from megatron_jam.checkpointing import load_checkpoint as load_run

    load_run(path, chunks, finetune=True, iteration=iteration)


def load_state_on_one_rank(path: str, cfg) -> dict[str, Tensor]:
    """The full canonical state dict of a checkpoint (one-rank world, TP=1)."""
    model = build_single(cfg, initialize=False)
    load_checkpoint([model], path)
    return {k: v for k, v in model.state_dict().items() if isinstance(v, Tensor)}


def read_hf_extra(path: str) -> dict[str, Tensor]:
    from safetensors.torch import load_file

    f = os.path.join(path, HF_EXTRA_FILE)
    return load_file(f) if os.path.exists(f) else {}
