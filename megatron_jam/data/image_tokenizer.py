"""VQ image tokenizer: image files -> codebook indices, via a `transformers` VQ model.

Why wrap a maintained model rather than ship our own VQ-GAN: CM3leon-style
image models are trained on the codes of a specific, frozen tokenizer, and
`transformers` maintains the Chameleon and Janus VQ-GANs (`ChameleonVQVAE`,
`JanusVQVAE`) with safetensors checkpoints. The model is loaded from a local
directory only (no downloads, `use_safetensors=True` so nothing is unpickled).

Nothing about the model is hard-coded: the codebook size is the quantizer's
embedding count and the tokens per image are measured by encoding one blank
image at the configured resolution, so any config of either family works.

Preprocessing follows Chameleon's image processor: RGB (transparent pixels
composited on white), shortest edge resized to the model resolution
(Lanczos), centre crop, pixel * 0.0078 - 1 (about [-1, 1]).
"""

from __future__ import annotations

import hashlib
import os
from typing import List, Sequence

import numpy as np

from megatron_jam.utils.logging import get_logger

logger = get_logger(__name__)

# model_type in config.json -> transformers class name
SUPPORTED_MODELS = {"chameleon_vqgan": "ChameleonVQVAE", "janus_vqgan": "JanusVQVAE"}
_RESCALE = 0.0078  # Chameleon's rescale factor; then - 1.0 (its mean/std are 1.0)


class ImageError(Exception):
    """An image file is missing (`reason` "missing_image") or unreadable ("corrupt_image")."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


def load_image(path: str):
    """Open and fully decode an image file as RGB (alpha composited on white)."""
    from PIL import Image, UnidentifiedImageError

    if not os.path.isfile(path):
        raise ImageError("missing_image", f"{path} does not exist")
    try:
        with Image.open(path) as im:
            im.load()
            if im.mode in ("RGBA", "LA", "P"):
                im = im.convert("RGBA")
                background = Image.new("RGBA", im.size, (255, 255, 255, 255))
                return Image.alpha_composite(background, im).convert("RGB")
            return im.convert("RGB")
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as e:
        raise ImageError("corrupt_image", f"{path}: {e}") from e


def _file_digest(paths: Sequence[str]) -> str:
    h = hashlib.sha256()
    for path in paths:
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 22), b""):
                h.update(block)
    return h.hexdigest()[:16]


class VQImageTokenizer:
    """A frozen VQ-GAN from a local `save_pretrained` directory.

    Attributes:
        codebook_size: number of codes (quantizer embedding rows).
        tokens_per_image: codes produced for one image.
        resolution: square input size in pixels.
        identity: "model_type:sha256-prefix" of config and weights, recorded in the vocabulary layout.
    """

    def __init__(self, path: str, device: str = "cpu") -> None:
        import torch
        import transformers

        transformers.logging.set_verbosity_error()
        transformers.utils.logging.disable_progress_bar()
        config_path = os.path.join(path, "config.json")
        if not os.path.isfile(config_path):
            raise FileNotFoundError(f"--image-tokenizer {path}: no config.json (expected a save_pretrained folder)")
        config = transformers.AutoConfig.from_pretrained(path, local_files_only=True)
        if config.model_type not in SUPPORTED_MODELS:
            raise ValueError(f"--image-tokenizer {path}: model_type {config.model_type!r} is not one of "
                             f"{sorted(SUPPORTED_MODELS)}")
        cls = getattr(transformers, SUPPORTED_MODELS[config.model_type])
        self.model = cls.from_pretrained(path, local_files_only=True, use_safetensors=True).to(device).eval()
        self.device = device
        self.resolution = int(config.resolution)
        self.codebook_size = int(self.model.quantize.embedding.num_embeddings)
        with torch.no_grad():
            probe = self._encode_tensor(torch.zeros(1, 3, self.resolution, self.resolution))
        self.tokens_per_image = int(probe.shape[1])
        weights = sorted(os.path.join(path, f) for f in os.listdir(path) if f.endswith(".safetensors"))
        self.identity = f"{config.model_type}:sha256:{_file_digest([config_path] + weights)}"
        logger.debug("loaded %s: codebook %d, %d tokens per %dpx image", self.identity, self.codebook_size,
                     self.tokens_per_image, self.resolution)

    def preprocess(self, image) -> np.ndarray:
        """PIL RGB image -> float32 [3, r, r] in about [-1, 1]."""
        from PIL import Image

        r = self.resolution
        w, h = image.size
        scale = r / min(w, h)
        size = (max(r, round(w * scale)), max(r, round(h * scale)))
        image = image.resize(size, Image.LANCZOS)
        left, top = (size[0] - r) // 2, (size[1] - r) // 2
        image = image.crop((left, top, left + r, top + r))
        pixels = np.asarray(image, dtype=np.float32) * _RESCALE - 1.0
        return pixels.transpose(2, 0, 1)

    def _encode_tensor(self, pixels):
        out = self.model.encode(pixels.to(self.device))
        indices = out.image_tokens if hasattr(out, "image_tokens") else out[2]
        return indices.reshape(pixels.shape[0], -1)

    def encode_images(self, images: List) -> np.ndarray:
        """PIL images -> int64 codes [n, tokens_per_image]."""
        import torch

        if not images:
            return np.zeros((0, self.tokens_per_image), dtype=np.int64)
        batch = torch.from_numpy(np.stack([self.preprocess(im) for im in images]))
        with torch.no_grad():
            codes = self._encode_tensor(batch)
        return codes.cpu().numpy().astype(np.int64)

    def encode_files(self, paths: Sequence[str]) -> np.ndarray:
        """Image files -> int64 codes [n, tokens_per_image]; raises ImageError naming the file."""
        return self.encode_images([load_image(p) for p in paths])
