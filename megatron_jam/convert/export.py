"""Export a single-stack megatron-jam checkpoint (import, uniform, width) to Hugging Face format.

The family comes from the checkpoint (`conversion.json`'s HF config, else
`ParentConfig.family`); the HF config keeps the imported model's other fields
(token ids, ...) and takes the shape from the checkpoint, so a JAM-Width model
exports as a wider Llama/OPT/Emu3. Tensors HF has and Megatron lacks (OPT's two
offset position rows) come back from `hf_extra.safetensors`, Emu3's VQ-VAE from
the `image_tokenizer/` folder the import extracted. Output:
config.json + one safetensors file per part (embedding, each layer, final) and
the `model.safetensors.index.json` that transformers' `from_pretrained` reads,
written under a temporary name and renamed. One part is in memory at a time.
"""

import json
import os
import shutil

import torch

from megatron_jam.convert.checkpoint import ensure_single_rank
from megatron_jam.convert.common import ConvertError, parent_parts
from megatron_jam.convert.readers import FAMILIES, MegatronParent
from megatron_jam.utils.logging import get_logger, log_rank0

logger = get_logger(__name__)

INDEX_FILE = "model.safetensors.index.json"


def export_hf(load: str, save: str) -> dict:
    """Write `save`/config.json + sharded safetensors from the checkpoint in `load`; returns the HF config."""
    from safetensors.torch import save_file

    if os.path.exists(save) and os.listdir(save):
        raise ConvertError(f"--save {save} exists and is not empty; choose a new folder")
    ensure_single_rank()
    src = MegatronParent(load)
    if src.hf_family not in FAMILIES:
        raise ConvertError(f"{load}: no Hugging Face family for {src.hf_family!r}")
    module = FAMILIES[src.hf_family]
    hf_cfg = module.hf_config(src.cfg, src.vocab_size, src.tied, base=src.hf_config)
    tmp = f"{save.rstrip('/')}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    try:
        parts, weight_map = parent_parts(src.cfg), {}
        for i, part in enumerate(parts):
            tensors = module.FAMILY.to_hf(src.read(part), src.cfg, src.tied)
            if not tensors:  # e.g. the final part of a tied model without a learnable norm
                continue
            name = f"model-{i + 1:05d}-of-{len(parts):05d}.safetensors"
            tensors = {k: (t if isinstance(t, torch.Tensor) else t[:]).contiguous() for k, t in tensors.items()}
            save_file(tensors, os.path.join(tmp, name),
                      metadata={"format": "pt"})
            weight_map |= {k: name for k in tensors}
        extras = getattr(module, "export_extras", None)  # tensors kept beside the model (Emu3's VQ-VAE)
        if extras is not None:
            hf_cfg, more = extras(load, tmp, hf_cfg)
            weight_map |= more
        with open(os.path.join(tmp, INDEX_FILE), "w") as f:
            json.dump({"metadata": {}, "weight_map": weight_map}, f, indent=2, sort_keys=True)
        with open(os.path.join(tmp, "config.json"), "w") as f:
            json.dump(hf_cfg, f, indent=2, sort_keys=True)
        if os.path.exists(save):
            os.rmdir(save)
        os.rename(tmp, save)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log_rank0(logger, "exported %s -> %s (%s)", load, save, hf_cfg["architectures"][0])
    return hf_cfg
