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
from megatron_jam.utils.logging import get_logger, log_rank0

logger = get_logger(__name__)

IMAGE_TOKENIZER_DIR = "image_tokenizer"
WEIGHTS_FILE = "model.safetensors"
COPY_BYTES = 1 << 26
PROCESSOR_FILE = "preprocessor_config.json"
"""The parent's image-processor settings (Emu3: min/max pixels, mean/std), copied along when present."""
VQ_FAMILIES = {"emu3": "vqmodel.*"}
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
    `VQImageTokenizer` sizes and normalises images for this VQ)."""
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(src.config, f, indent=2, sort_keys=True)
    copy_tensors(src.tensors, os.path.join(folder, WEIGHTS_FILE))
    processor = os.path.join(src.where, PROCESSOR_FILE)
    if os.path.isfile(processor):
        shutil.copyfile(processor, os.path.join(folder, PROCESSOR_FILE))


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
