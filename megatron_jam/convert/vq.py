"""A parent's VQ image tokenizer, kept beside the language model: extracted on import, put back on export.

Emu3 checkpoints hold their VQ-VAE (`Emu3VQVAE`, keys `vqmodel.*`) in the same
safetensors files as the language model. It is no part of the Megatron model:
the converter copies those tensors byte for byte (same dtype, nothing decoded,
at most `COPY_BYTES` in memory) into `SAVE/image_tokenizer/` (config.json +
model.safetensors, a folder `transformers.Emu3VQVAE.from_pretrained` loads),
and `--method export` copies them back under their prefix. A merge takes the
image parent's tokenizer; a megatron-jam parent passes on the folder it has.
"""

import json
import os
import shutil
import struct
from dataclasses import dataclass

from megatron_jam.convert.common import ConvertError
from megatron_jam.data.chameleon_vqgan import DECODER_FILE  # Chameleon's decoder, copied along with its VQ
from megatron_jam.data.run_files import IMAGE_TOKENIZER_DIR
from megatron_jam.utils.logging import get_logger, log_rank0

logger = get_logger(__name__)

WEIGHTS_FILE = "model.safetensors"
COPY_BYTES = 1 << 26
PROCESSOR_FILE = "preprocessor_config.json"
"""The parent's image-processor settings (Emu3: min/max pixels, mean/std), copied along when present."""
VQ_FAMILIES = {"emu3": "vqmodel.*", "chameleon": "model.vqmodel.*"}
"""HF families whose checkpoints can hold the VQ model, and under which keys."""


@dataclass(frozen=True)
class ImageTokenizerSource:
    """A VQ model somewhere on disk: its config.json and where each of its tensors is stored."""

    config: dict
    tensors: dict[str, tuple[str, str]]
    """Name inside the VQ model -> (safetensors file, name stored there)."""
    where: str
    """The folder it comes from (for log lines and conversion.json)."""


def safetensors_header(path: str) -> tuple[dict, int]:
    """(header, offset of the data section) of a safetensors file."""
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        return json.loads(f.read(n)), 8 + n


def copy_tensors(tensors: dict[str, tuple[str, str]], out: str) -> None:
    """Write the safetensors file `out` holding {new name: (file, stored name)}, copied byte for byte."""
    headers, entries, ranges, offset = {}, {}, [], 0
    for name in sorted(tensors):
        src, stored = tensors[name]
        if src not in headers:
            headers[src] = safetensors_header(src)
        header, data_start = headers[src]
        if stored not in header:
            raise ConvertError(f"{src}: tensor {stored} is not in this file")
        begin, end = header[stored]["data_offsets"]
        entries[name] = {"dtype": header[stored]["dtype"], "shape": header[stored]["shape"],
                         "data_offsets": [offset, offset + end - begin]}
        ranges.append((src, data_start + begin, end - begin))
        offset += end - begin
    head = json.dumps({"__metadata__": {"format": "pt"}} | entries, separators=(",", ":")).encode()
    head += b" " * (-len(head) % 8)  # the data section starts 8-byte aligned
    with open(out, "wb") as f:
        f.write(struct.pack("<Q", len(head)) + head)
        for src, start, size in ranges:
            _copy_range(src, start, size, f)


def _copy_range(src: str, start: int, size: int, dst) -> None:
    with open(src, "rb") as f:
        f.seek(start)
        while size > 0:
            chunk = f.read(min(size, COPY_BYTES))
            if not chunk:
                raise ConvertError(f"{src}: file is truncated")
            dst.write(chunk)
            size -= len(chunk)


def write_image_tokenizer(src: ImageTokenizerSource, folder: str) -> None:
    """`folder`/config.json + `folder`/model.safetensors (+ the source's preprocessor_config.json: how
    `VQImageTokenizer` sizes and normalises images for this VQ; + its decoder.safetensors: Chameleon's decoder)."""
    os.makedirs(folder, exist_ok=True)
    if _written_folder(src):  # byte for byte: the folder's identity (a hash of its files) stays the layout's
        for name in ("config.json", WEIGHTS_FILE):
            shutil.copyfile(os.path.join(src.where, name), os.path.join(folder, name))
    else:
        with open(os.path.join(folder, "config.json"), "w") as f:
            json.dump(src.config, f, indent=2, sort_keys=True)
        copy_tensors(src.tensors, os.path.join(folder, WEIGHTS_FILE))
    for name in (PROCESSOR_FILE, DECODER_FILE):
        if os.path.isfile(os.path.join(src.where, name)):
            shutil.copyfile(os.path.join(src.where, name), os.path.join(folder, name))


def _written_folder(src: ImageTokenizerSource) -> bool:
    """Whether `src` is a VQ folder as is (a run's or an earlier conversion's image_tokenizer/: config.json and
    model.safetensors holding every tensor under its own name), not tensors inside a parent's checkpoint."""
    weights = os.path.join(src.where, WEIGHTS_FILE)
    return os.path.isfile(os.path.join(src.where, "config.json")) and all(
        f == weights and k == stored for k, (f, stored) in src.tensors.items())


def read_image_tokenizer(folder: str) -> ImageTokenizerSource | None:
    """The VQ model of a folder written by `write_image_tokenizer`; None when there is none."""
    cfg, weights = os.path.join(folder, "config.json"), os.path.join(folder, WEIGHTS_FILE)
    if not (os.path.exists(cfg) and os.path.exists(weights)):
        return None
    with open(cfg) as f:
        config = json.load(f)
    header, _ = safetensors_header(weights)
    return ImageTokenizerSource(config, {k: (weights, k) for k in header if k != "__metadata__"}, folder)


def extract_image_tokenizer(parent, tmp: str, save: str) -> dict | None:
    """Copy `parent`'s VQ model (if it has one) into `tmp`/image_tokenizer (published as `save`/...);
    one log line either way for families that carry one. Returns the conversion.json entry."""
    src = parent.image_tokenizer()
    if src is None:
        if parent.hf_family in VQ_FAMILIES:
            log_rank0(logger, "%s has no VQ image tokenizer tensors (%s): images will need --image-tokenizer",
                      parent.path, VQ_FAMILIES[parent.hf_family])
        return None
    write_image_tokenizer(src, os.path.join(tmp, IMAGE_TOKENIZER_DIR))
    folder = os.path.join(save, IMAGE_TOKENIZER_DIR)
    log_rank0(logger, "extracted the VQ image tokenizer of %s (%d tensors) to %s (%s.from_pretrained)",
              src.where, len(src.tensors), folder, src.config.get("architectures", ["a VQ model"])[0])
    return {"folder": IMAGE_TOKENIZER_DIR, "source": src.where, "model_type": src.config.get("model_type"),
            "tensors": len(src.tensors)}


def embedded_image_tokenizer(hf: dict, files: dict[str, str], path: str, prefixes, model_type: str,
                             architecture: str) -> ImageTokenizerSource | None:
    """The VQ model stored inside a multimodal checkpoint under one of `prefixes` (file names from the
    safetensors index `files`), with a config.json built from the parent's `vq_config`; None when absent."""
    tensors = {}
    for prefix in prefixes:
        tensors |= {k[len(prefix):]: (os.path.join(path, f), k) for k, f in files.items() if k.startswith(prefix)}
    if not tensors:
        return None
    cfg = dict(hf.get("vq_config") or {})
    if "dtype" in hf and "dtype" not in cfg:
        cfg["dtype"] = hf["dtype"]
    return ImageTokenizerSource(cfg | {"model_type": model_type, "architectures": [architecture]}, tensors, path)


def export_image_tokenizer(load: str, out_dir: str, hf_cfg: dict, prefix: str, vq_file: str,
                           architecture: str) -> tuple[dict, dict[str, str]]:
    """Put an imported VQ model back into an export as `prefix`* tensors in `vq_file`: (config with its
    vq_config, {tensor: file} for the index). Without `load`/image_tokenizer/ the export has none (one log line)."""
    src = read_image_tokenizer(os.path.join(load, IMAGE_TOKENIZER_DIR))
    if src is None:
        log_rank0(logger, "%s has no %s/: the export has no %s* tensors (%s will initialise its VQ model "
                  "randomly); copy the parent's in to encode images", load, IMAGE_TOKENIZER_DIR, prefix, architecture)
        return hf_cfg, {}
    vq = {k: v for k, v in src.config.items() if k not in ("architectures", "transformers_version")}
    copy_tensors({prefix + k: t for k, t in src.tensors.items()}, os.path.join(out_dir, vq_file))
    log_rank0(logger, "put the VQ model of %s (%d tensors) back as %s* (%s)", src.where, len(src.tensors),
              prefix, vq_file)
    return hf_cfg | {"vq_config": vq}, {prefix + k: vq_file for k in src.tensors}
