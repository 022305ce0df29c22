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

Emu3 (`Emu3VQVAE`, `emu3_vqgan`, e.g. the `image_tokenizer/` folder the
converter extracts from an Emu3 checkpoint) encodes an image at its own size,
as Emu3's image processor does: both sides rounded to multiples of the spatial
factor (2 ** (levels - 1), 8 for Emu3) with the pixel count kept within
[min_pixels, max_pixels] (`smart_resize`), bicubic, (pixel / 255 - 0.5) / 0.5;
those settings come from a `preprocessor_config.json` in the folder when there is
one, else Emu3's defaults. So each image gets its own latent grid (h, w), which
the Emu3 image format writes into the tokens (`encode_grids`). Given a
`resolution`, it encodes at that square size like the other families instead.
`decode_grid` turns a [h, w] grid back into an image of (8h, 8w) pixels: the
still image is the first frame of Emu3's temporal decoder.

Chameleon (`chameleon_vqgan`) decodes when the folder also holds `decoder.safetensors`
(tools/convert_image_tokenizer.py writes it from Meta's released `vqgan.ckpt`): the project's
VQGAN decoder (`chameleon_vqgan.py`) after transformers' codebook and post_quant_conv. That file
is left out of `identity`, which names what the codes mean, so adding a decoder keeps a dataset's
layout valid.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from typing import TYPE_CHECKING, List, Sequence

import numpy as np

from megatron_jam.utils.logging import get_logger

if TYPE_CHECKING:  # annotations only: PIL loads when an image does
    from PIL import Image

logger = get_logger(__name__)

# model_type in config.json -> transformers class name
SUPPORTED_MODELS = {"chameleon_vqgan": "ChameleonVQVAE", "janus_vqgan": "JanusVQVAE", "emu3_vqgan": "Emu3VQVAE"}
EMU3 = "emu3_vqgan"
EMU3_PROCESSOR_DEFAULTS = {"min_pixels": 512 * 512, "max_pixels": 1024 * 1024, "image_mean": [0.5] * 3,
                           "image_std": [0.5] * 3, "rescale_factor": 1 / 255, "resample": 3}
"""Emu3's image processing when the folder has no preprocessor_config.json (resample 3: bicubic; mean and
std 0.5 map pixels to [-1, 1], the range the VQ-VAE's decoder writes)."""
_RESCALE = 0.0078  # Chameleon's rescale factor; then - 1.0 (its mean/std are 1.0)


class ImageError(Exception):
    """An image file is missing (`reason` "missing_image"), unreadable ("corrupt_image") or of a shape the
    tokenizer cannot resize ("image_size": Emu3's aspect-ratio limit)."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


def load_image(path: str):
    """Open and fully decode an image file as RGB (alpha composited on white)."""
    from PIL import Image, UnidentifiedImageError

    if not os.path.isfile(path):
        raise ImageError("missing_image", f"{path} is a directory" if os.path.isdir(path) else f"{path} does not exist")
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


def _weight_files(path: str) -> List[str]:
    """The VQ folder's weights: every *.safetensors but Chameleon's decoder (no part of what codes mean)."""
    from megatron_jam.data.chameleon_vqgan import DECODER_FILE

    return sorted(os.path.join(path, f) for f in os.listdir(path) if f.endswith(".safetensors") and f != DECODER_FILE)


def folder_identity(path: str) -> str:
    """`VQImageTokenizer(path).identity` without loading the model (what run folders check before copying)."""
    config_path = os.path.join(path, "config.json")
    with open(config_path, encoding="utf-8") as f:
        model_type = json.load(f).get("model_type")
    return f"{model_type}:sha256:{_file_digest([config_path] + _weight_files(path))}"


def _config_resolution(config, path: str) -> int:
    """Input size in pixels: config.resolution, else (Janus saves none) num_patches times the encoder's
    downsampling, 2 ** (len(channel_multiplier) - 1): one stride-2 conv between consecutive levels."""
    if getattr(config, "resolution", None):
        return int(config.resolution)
    patches, levels = getattr(config, "num_patches", None), getattr(config, "channel_multiplier", None)
    if patches and levels:
        return int(patches) * 2 ** (len(levels) - 1)
    raise ValueError(f"--image-tokenizer {path}: config.json has no resolution and no num_patches/channel_multiplier "
                     "to derive it from")


class VQImageTokenizer:
    """A frozen VQ-GAN from a local `save_pretrained` directory.

    Attributes:
        codebook_size: number of codes (quantizer embedding rows).
        tokens_per_image: codes produced for one image at `resolution` (with `own_size`, for a square image
            at that size: images of other shapes get other grids).
        resolution: square input size in pixels (with `own_size`: the largest square within max_pixels).
        grid: latent grid (h, w) of an image at `resolution`.
        own_size: whether images are encoded at their own size (Emu3), each with its own grid.
        spatial_factor: pixels per latent cell along each side.
        identity: "model_type:sha256-prefix" of config and weights, recorded in the vocabulary layout.
    """

    def __init__(self, path: str, device: str = "cpu", resolution: int | None = None) -> None:
        import torch
        import transformers

        from megatron_jam.data.chameleon_vqgan import load_decoder

        transformers.logging.set_verbosity_error()
        transformers.utils.logging.disable_progress_bar()
        path = _checkpoint_tokenizer(path)
        config_path = os.path.join(path, "config.json")
        if not os.path.isfile(config_path):
            raise FileNotFoundError(_missing_folder_message(path))
        config = transformers.AutoConfig.from_pretrained(path, local_files_only=True)
        if config.model_type not in SUPPORTED_MODELS:
            hint = ("; import the Emu3 model (tools/convert_checkpoint.py --method import) and pass its "
                    "image_tokenizer/" if config.model_type == "emu3" else "")
            raise ValueError(f"--image-tokenizer {path}: model_type {config.model_type!r} is not one of "
                             f"{sorted(SUPPORTED_MODELS)}{hint}")
        weights = _weight_files(path)
        if not weights:
            raise FileNotFoundError(f"--image-tokenizer {path}: no *.safetensors weights next to config.json")
        cls = getattr(transformers, SUPPORTED_MODELS[config.model_type])
        self.model = cls.from_pretrained(path, local_files_only=True, use_safetensors=True).to(device).eval()
        self.device, self.kind, self.own_size = device, config.model_type, False
        self.decoder = load_decoder(path, config, device) if self.kind == "chameleon_vqgan" else None
        if self.kind == EMU3:
            self._setup_emu3(path, resolution)
        else:
            self.resolution = resolution or _config_resolution(config, path)
        self.codebook_size = int(self.model.quantize.embedding.num_embeddings)
        if self.kind == EMU3:  # the grid is known: no probe through a large VQ at load time
            self.grid = (self.resolution // self.spatial_factor,) * 2
            self.tokens_per_image = self.grid[0] * self.grid[1]
        else:  # measured: one blank image at the model resolution
            with torch.no_grad():
                probe = self._encode_tensor(torch.zeros(1, 3, self.resolution, self.resolution))
            self.tokens_per_image = int(probe.shape[1])
            self.grid = _square_grid(self.tokens_per_image)
            self.spatial_factor = max(1, self.resolution // self.grid[1])
        self.identity = f"{config.model_type}:sha256:{_file_digest([config_path] + weights)}"
        logger.debug("loaded %s: codebook %d, %d tokens per %dpx image%s", self.identity, self.codebook_size,
                     self.tokens_per_image, self.resolution, " (images at their own size)" if self.own_size else "")

    def _setup_emu3(self, path: str, resolution: int | None) -> None:
        """Emu3's processor settings (preprocessor_config.json, else its defaults) and the spatial factor."""
        settings = dict(EMU3_PROCESSOR_DEFAULTS)
        processor = os.path.join(path, "preprocessor_config.json")
        if os.path.isfile(processor):
            with open(processor) as f:
                settings |= {k: v for k, v in json.load(f).items() if k in EMU3_PROCESSOR_DEFAULTS}
        self.spatial_factor = int(self.model.vision_spatial_factor)
        self.min_pixels, self.max_pixels = int(settings["min_pixels"]), int(settings["max_pixels"])
        self.resample = int(settings["resample"])
        self.norm = (float(settings["rescale_factor"]), np.asarray(settings["image_mean"], dtype=np.float32),
                     np.asarray(settings["image_std"], dtype=np.float32))
        f = self.spatial_factor
        if resolution is not None and (resolution < f or resolution % f):
            raise ValueError(f"--image-tokenizer {path}: resolution {resolution} is not a positive multiple of the "
                             f"VQ's spatial factor {f}")
        self.own_size = resolution is None
        self.resolution = resolution or max(f, math.isqrt(self.max_pixels) // f * f)

    @property
    def has_decoder(self) -> bool:
        """Whether codes can be turned back into pixels (`ChameleonVQVAE` ships only the encoder: Chameleon
        needs the project's decoder from `decoder.safetensors`)."""
        return hasattr(self.model, "decode") or self.decoder is not None

    def preprocess(self, image) -> np.ndarray:
        """PIL RGB image -> float32 [3, r, r] in about [-1, 1] (shortest edge to r, centre crop)."""
        from PIL import Image

        r = self.resolution
        w, h = image.size
        scale = r / min(w, h)
        size = (max(r, round(w * scale)), max(r, round(h * scale)))
        image = image.resize(size, getattr(self, "resample", Image.LANCZOS))
        left, top = (size[0] - r) // 2, (size[1] - r) // 2
        image = image.crop((left, top, left + r, top + r))
        return _normalize(image, getattr(self, "norm", None))

    def preprocess_own_size(self, image) -> np.ndarray:
        """PIL RGB image -> float32 [3, H, W] at its own size within Emu3's limits (`smart_resize`: H and W
        multiples of the spatial factor, min_pixels <= H * W <= max_pixels, the aspect ratio kept)."""
        from transformers.models.emu3.image_processing_emu3 import smart_resize

        w, h = image.size
        try:
            rh, rw = smart_resize(h, w, factor=self.spatial_factor, min_pixels=self.min_pixels,
                                  max_pixels=self.max_pixels)
        except ValueError as e:
            raise ImageError("image_size", f"{w}x{h} pixels: {e}") from e
        return _normalize(image.resize((rw, rh), self.resample), self.norm)

    def _encode_tensor(self, pixels):
        """float [n, 3, H, W] -> int codes [n, h * w] (row-major over the latent grid)."""
        if self.kind == EMU3:
            import torch

            sizes = torch.tensor([list(pixels.shape[-2:])] * pixels.shape[0])
            tokens = self.model.encode(pixels.to(self.device), sizes).image_tokens  # n x [h, w]
            return torch.stack(list(tokens)).reshape(pixels.shape[0], -1)
        out = self.model.encode(pixels.to(self.device))
        indices = out.image_tokens if hasattr(out, "image_tokens") else out[2]
        return indices.reshape(pixels.shape[0], -1)

    def encode_images(self, images: List) -> np.ndarray:
        """PIL images -> int64 codes [n, tokens_per_image] at `resolution` (see `encode_grids` for own sizes)."""
        import torch

        if not images:
            return np.zeros((0, self.tokens_per_image), dtype=np.int64)
        batch = torch.from_numpy(np.stack([self.preprocess(im) for im in images]))
        with torch.no_grad():
            codes = self._encode_tensor(batch)
        return codes.cpu().numpy().astype(np.int64)

    def encode_grids(self, images: List) -> List[np.ndarray]:
        """PIL images -> one int64 code grid [h, w] per image: its own grid with `own_size` (each image
        encoded alone), else the tokenizer's `grid`."""
        import torch

        if not self.own_size:
            return list(self.encode_images(images).reshape(len(images), *self.grid))
        grids = []
        for im in images:
            pixels = torch.from_numpy(self.preprocess_own_size(im))[None]
            with torch.no_grad():
                codes = self._encode_tensor(pixels)
            h, w = pixels.shape[-2] // self.spatial_factor, pixels.shape[-1] // self.spatial_factor
            grids.append(codes.cpu().numpy().astype(np.int64).reshape(h, w))
        return grids

    def encode_files(self, paths: Sequence[str]) -> np.ndarray:
        """Image files -> int64 codes [n, tokens_per_image]; raises ImageError naming the file."""
        return self.encode_images([load_image(p) for p in paths])

    def encode_file_grids(self, paths: Sequence[str]) -> List[np.ndarray]:
        """Image files -> one int64 code grid [h, w] each (`encode_grids`); raises ImageError naming the file."""
        return self.encode_grids([load_image(p) for p in paths])

    def decode_grid(self, codes, grid) -> "Image.Image":
        """Codes of one image (flat row-major or [h, w]) on latent grid (h, w) -> a PIL RGB image
        (Emu3 and Chameleon: (h * factor) x (w * factor) pixels; Janus: its fixed resolution). ValueError for codes
        outside the codebook, which would otherwise index past the quantizer's table."""
        import torch
        from PIL import Image

        from megatron_jam.data.chameleon_vqgan import decode_codes

        h, w = (int(g) for g in grid)
        codes = torch.as_tensor(np.asarray(codes, dtype=np.int64).reshape(-1), device=self.device)
        if codes.numel() != h * w:
            raise ValueError(f"{codes.numel()} codes do not fill a {h}x{w} grid")
        if codes.numel() and (int(codes.min()) < 0 or int(codes.max()) >= self.codebook_size):
            bad = int(codes[(codes < 0) | (codes >= self.codebook_size)][0])
            raise ValueError(f"image code {bad} is outside the VQ codebook [0, {self.codebook_size})")
        with torch.no_grad():
            if self.decoder is not None:
                pixels = decode_codes(self.model, self.decoder, codes.reshape(1, h, w))
            else:
                pixels = self.model.decode(codes.reshape(1, h, w) if self.kind == EMU3 else codes.reshape(1, h * w))
        return Image.fromarray(_to_uint8(pixels[0].float().cpu().numpy(), getattr(self, "norm", None)))


def _square_grid(n: int) -> tuple:
    side = math.isqrt(n)
    return (side, side) if side * side == n else (1, n)


def _normalize(image, norm) -> np.ndarray:
    """PIL RGB -> float32 [3, H, W]: (pixel * rescale - mean) / std, or Chameleon's pixel * 0.0078 - 1."""
    pixels = np.asarray(image, dtype=np.float32)
    if norm is None:
        return (pixels * _RESCALE - 1.0).transpose(2, 0, 1)
    rescale, mean, std = norm
    return ((pixels * rescale - mean) / std).astype(np.float32).transpose(2, 0, 1)


def _to_uint8(pixels: np.ndarray, norm) -> np.ndarray:
    """Decoder output [3, H, W] -> uint8 [H, W, 3]: the inverse of `_normalize` (Emu3's `postprocess`), or
    (x + 1) * 127.5 for Chameleon-style models."""
    if norm is None:
        arr = (np.clip(pixels, -1, 1) + 1) * 127.5
    else:
        rescale, mean, std = norm
        arr = np.clip((pixels * std[:, None, None] + mean[:, None, None]) / rescale, 0, 255)
    return np.round(arr).astype(np.uint8).transpose(1, 2, 0)


def _checkpoint_tokenizer(path: str) -> str:
    """A converted checkpoint given as the tokenizer stands for the image_tokenizer/ folder it holds."""
    inner = os.path.join(path, "image_tokenizer")
    if not os.path.isfile(os.path.join(path, "config.json")) and os.path.isfile(os.path.join(inner, "config.json")):
        logger.info("--image-tokenizer %s: using the checkpoint's %s", path, inner)
        return inner
    return path


def _missing_folder_message(path: str) -> str:
    """Why `path` holds no VQ model, with the likely cause when it is (inside) a converted checkpoint."""
    parent = os.path.dirname(os.path.abspath(path))
    if os.path.isfile(os.path.join(path, "model_config.json")):
        return (f"--image-tokenizer {path}: a checkpoint without image_tokenizer/ (its parent had no VQ weights, "
                "e.g. no vqmodel.* tensors in an Emu3 folder); pass the VQ model's own folder")
    if os.path.basename(os.path.normpath(path)) == "image_tokenizer" and os.path.isfile(
            os.path.join(parent, "model_config.json")):
        return (f"--image-tokenizer {path}: the checkpoint {parent} has no image_tokenizer/ (its parent had no VQ "
                "weights, e.g. no vqmodel.* tensors in an Emu3 folder); pass the VQ model's own folder")
    return f"--image-tokenizer {path}: no config.json (expected a save_pretrained folder)"
