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
So that the folder works with `AutoTokenizer` and `generate()` as it is, it also
gets the text tokenizer's files (the checkpoint's `tokenizer/` copy, else its
parents' folders), the tokenizer's bos/eos/pad ids in config.json (`<eos>` the
checkpoint's layout's) and `generation_config.json`. JAM-Cross is refused: no
transformers architecture has two stacks joined by cross-attention.
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
    _refuse_two_stacks(load)
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
        hf_cfg = export_tokenizer(load, tmp, hf_cfg)
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


def _refuse_two_stacks(load: str) -> None:
    """JAM-Cross (two stacks joined by cross-attention blocks) is no architecture transformers has."""
    from megatron_jam.models.kinds import kind_of, load_model_config

    cfg = load_model_config(load)
    if not kind_of(cfg).single_stack:
        raise ConvertError(f"--method export: {load} is a {kind_of(cfg).describe(cfg)} checkpoint, which has no "
                           "Hugging Face architecture (two stacks joined by cross-attention); only single-stack "
                           "checkpoints (import, uniform, width) export")


def export_tokenizer(load: str, out: str, hf_cfg: dict) -> dict:
    """The text tokenizer's files in `out`, its bos/eos/pad ids in the config (`<eos>` the layout's, when the
    checkpoint has one) and `generation_config.json`: what `AutoTokenizer` and `generate()` read. Returns the
    HF config."""
    from transformers import GenerationConfig

    from megatron_jam.data.integrity import checkpoint_layout
    from megatron_jam.data.run_files import tokenizer_files
    from megatron_jam.data.text_tokenizer import TextTokenizerError, load_text_tokenizer

    path = _tokenizer_source(load)
    ids = {k: hf_cfg.get(k) for k in ("bos_token_id", "eos_token_id", "pad_token_id")}
    if path is None:
        log_rank0(logger, "%s carries no text tokenizer (tokenizer/) and its parents' folders hold none: the "
                  "export has no tokenizer files", load)
    else:
        try:
            tokenizer = load_text_tokenizer(path)
        except TextTokenizerError as e:
            raise ConvertError(f"{load}: the text tokenizer to export: {e}") from e
        for src, name in tokenizer_files(path):
            shutil.copyfile(src, os.path.join(out, name))
        if not os.path.exists(os.path.join(out, "tokenizer_config.json")) and hasattr(tokenizer, "sp"):
            _write_sentencepiece_config(tokenizer.sp, out)
        ids |= {k: v for k, v in tokenizer.special_ids().items() if v is not None}
    layout = checkpoint_layout(load)[0]
    if layout is not None:
        ids["eos_token_id"] = layout.eos_id  # the end of document the model was trained with
    generation = {k: v for k, v in ids.items() if v is not None}
    generation.setdefault("pad_token_id", generation.get("eos_token_id"))
    GenerationConfig(**generation).save_pretrained(out)
    return hf_cfg | ids


def _tokenizer_source(load: str) -> str | None:
    """The checkpoint's own tokenizer copy (`tokenizer/`), else its parents' (conversion.json `parents`)."""
    from megatron_jam.convert.checkpoint import CONVERSION_FILE
    from megatron_jam.convert.readers import tokenizer_file

    found = tokenizer_file(load)
    if found or not os.path.exists(os.path.join(load, CONVERSION_FILE)):
        return found or None
    with open(os.path.join(load, CONVERSION_FILE)) as f:
        sources = json.load(f).get("parents") or []
    # "hf:<family>:<path>" or "megatron-jam:<path>" (readers' `source`)
    folders = [s.split(":", 2)[2] if s.startswith("hf:") else s.split(":", 1)[1] for s in sources]
    return next((tokenizer_file(p) for p in folders if os.path.isdir(p) and tokenizer_file(p)), None)


def _write_sentencepiece_config(sp, out: str) -> None:
    """tokenizer_config.json for a bare sentencepiece model: transformers' generic sentencepiece class, its
    special pieces by name, no bos/eos added (as every megatron-jam tool encodes)."""
    names = {"bos_token": sp.bos_id(), "eos_token": sp.eos_id(), "unk_token": sp.unk_id(), "pad_token": sp.pad_id()}
    config = {"tokenizer_class": "SentencePieceBackend", "add_bos_token": False, "add_eos_token": False}
    config |= {k: sp.id_to_piece(v) for k, v in names.items() if v >= 0}
    with open(os.path.join(out, "tokenizer_config.json"), "w") as f:
        json.dump(config, f, indent=2, sort_keys=True)
