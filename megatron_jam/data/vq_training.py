"""Train a small VQ image tokenizer (a `transformers` `JanusVQVAE`) from scratch on CPU.

Why: the embedded demo needs an image tokenizer whose decoded codes still
show the picture (colour and shape), and pretrained VQ-GANs are far too
large for a CPU laptop. A thousand-step VQ-VAE on tiny flat-shape images
(about 40 s on 2 threads for 32 px, 16 tokens) is enough, and saving it as a
stock `JanusVQVAE` means the rest of the project (`VQImageTokenizer`,
`render.decode_images`) loads it unchanged.

The quantizer is trained the way transformers' Janus model *decodes*:
`JanusVQVAEVectorQuantizer.get_codebook_entry` L2-normalises codebook rows,
while its `forward` looks up raw rows by Euclidean distance. We therefore
quantize L2-normalised latents against L2-normalised codes (cosine nearest
neighbour, as LlamaGen does) and save unit-norm codebook rows; with unit rows
the stock Euclidean lookup picks the same code and decoding sees the same
vector, so encode -> decode through transformers reproduces training exactly.

Objective: pixel MSE + L1, plus the VQ-VAE codebook and commitment terms with
the straight-through estimator. The pixel terms weight figure pixels (those
unlike the image's border colour) 1 + `foreground_weight` times the background
(weights renormalised to mean 1). With a plain loss the white background
dominates, and the encoder (whose GroupNorm(32 groups, 32 channels) is a
per-channel instance norm, so colour survives only in channel ratios) often
settles on latents that cannot tell the dark colours apart: on the picture
world red, blue and purple images got identical codes and red, blue, green and
purple all decoded as purple (colour read back 0.5). Weight 1.5 reads every
colour back (1.0 on seeds 1234, 2 and 3; shape 0.91-0.94) and halves held-out
MSE (0.135 -> 0.053); 0.75 still collapsed on seed 2, and 4 costs shape
accuracy (0.79). Codes unused for `restart_interval` steps are
re-initialised from recent encoder outputs, which keeps a short run from
collapsing onto a handful of codes.

Defaults are tuned for that demo: no residual blocks in the encoder (one per
decoder level) halves the step time on CPU at about the same quality per
step, and PyTorch's conv init replaces transformers' N(0, 0.02).
"""

from __future__ import annotations

import math
import os
import time
import types
from typing import Callable, Dict, List, Optional, Sequence

import torch
import torch.nn.functional as F

from megatron_jam.data.image_tokenizer import VQImageTokenizer
from megatron_jam.utils.logging import get_logger

logger = get_logger(__name__)

GROUP_NORM_GROUPS = 32  # the Janus blocks hard-code GroupNorm(32, channels)


def latent_side(image_size: int, tokens_per_image: int) -> int:
    """Side of the square latent grid; the downsampling must be a power of two (one stride-2 conv per level)."""
    side = math.isqrt(tokens_per_image)
    if tokens_per_image < 1 or side * side != tokens_per_image:
        raise ValueError(f"--tokens-per-image {tokens_per_image} is not a square number")
    factor = image_size // side
    if image_size % side or factor & (factor - 1):
        raise ValueError(f"--tokens-per-image {tokens_per_image}: latent side {side} must divide --image-size "
                         f"{image_size} by a power of two")
    return side


def channel_multipliers(levels: int, num_res_blocks: int) -> List[int]:
    """Per-level width multipliers that the stock Janus encoder can build.

    With residual blocks: Janus's own pattern (1, 1, 2, 2, 4, ...) cut to
    `levels`. Without them (`num_res_blocks=0`, the fast CPU setting) the
    encoder never changes width, yet sizes its middle block from the
    second-to-last multiplier, so every level but the last must be 1; the
    last (decoder-only) level gets 2x width for the attention-bearing bottom.
    """
    if num_res_blocks > 0:
        return [2 ** (i // 2) for i in range(levels)]
    return [1] * (levels - 1) + [2] if levels > 1 else [1]


def build_model(image_size: int = 32, tokens_per_image: int = 16, codebook_size: int = 256,
                base_channels: int = 32, embed_dim: int = 8, latent_channels: int = 32,
                num_res_blocks: int = 0, seed: int = 1234):
    """A freshly initialised `JanusVQVAE` whose config also records `resolution` (transformers keeps the key)."""
    from transformers import JanusVQVAE, JanusVQVAEConfig

    side = latent_side(image_size, tokens_per_image)
    if base_channels < GROUP_NORM_GROUPS or base_channels % GROUP_NORM_GROUPS:
        raise ValueError(f"--base-channels {base_channels} must be a multiple of {GROUP_NORM_GROUPS} "
                         "(Janus blocks use GroupNorm with 32 groups)")
    if codebook_size < 2:
        raise ValueError(f"--codebook-size {codebook_size} must be at least 2")
    multipliers = channel_multipliers(int(math.log2(image_size // side)) + 1, num_res_blocks)
    config = JanusVQVAEConfig(embed_dim=embed_dim, num_embeddings=codebook_size, latent_channels=latent_channels,
                              base_channels=base_channels, channel_multiplier=multipliers,
                              num_res_blocks=num_res_blocks, num_patches=side, dropout=0.0, resolution=image_size)
    torch.manual_seed(seed)
    model = JanusVQVAE(config)
    reset_convolutions(model)
    normalise_codebook(model)
    return model


def reset_convolutions(model) -> None:
    """PyTorch's default (Kaiming-uniform) conv init instead of transformers' N(0, 0.02).

    The 0.02 normal suits transformers' linear layers, but it starts a conv
    stack with vanishing outputs; a from-scratch run of a few hundred steps
    learns colour markedly faster from PyTorch's fan-in-scaled init.
    """
    for module in model.modules():
        if isinstance(module, torch.nn.Conv2d):
            module.reset_parameters()


def normalise_codebook(model) -> None:
    """Make codebook rows unit-norm, so transformers' Euclidean lookup equals our cosine lookup."""
    with torch.no_grad():
        weight = model.quantize.embedding.weight
        weight.copy_(F.normalize(weight, dim=-1))


def pixels_from_images(images: Sequence, image_size: int) -> torch.Tensor:
    """PIL images -> float32 [n, 3, s, s] through `VQImageTokenizer.preprocess` itself.

    Reusing the tokenizer's own code (resize, centre crop, pixel * 0.0078 - 1)
    guarantees training sees exactly what the project's encoder will see.
    """
    import numpy as np

    holder = types.SimpleNamespace(resolution=image_size)
    return torch.from_numpy(np.stack([VQImageTokenizer.preprocess(holder, im) for im in images]))


def encode_latents(model, pixels: torch.Tensor) -> torch.Tensor:
    """Encoder -> quant_conv -> L2-normalised latents [n, h, w, embed_dim]."""
    latents = model.quant_conv(model.encoder(pixels))
    return F.normalize(latents.permute(0, 2, 3, 1), dim=-1)


def quantize(model, latents: torch.Tensor):
    """Nearest unit-norm code per latent: (codes vectors, indices) with codes as the stock decoder sees them."""
    codebook = F.normalize(model.quantize.embedding.weight, dim=-1)
    flat = latents.reshape(-1, latents.shape[-1])
    indices = torch.argmax(flat @ codebook.t(), dim=1)
    return codebook[indices].view(latents.shape), indices.view(latents.shape[:-1])


def decode_latents(model, quantized: torch.Tensor) -> torch.Tensor:
    """[n, h, w, d] code vectors -> pixels [n, 3, s, s], the same path as `JanusVQVAE.decode`."""
    return model.decoder(model.post_quant_conv(quantized.permute(0, 3, 1, 2).contiguous()))


FOREGROUND_THRESHOLD = 0.1  # a pixel whose channels differ this much from the background (model space) is figure


def pixel_weights(pixels: torch.Tensor, foreground_weight: float) -> torch.Tensor:
    """[n, 1, s, s] per-pixel loss weights with mean 1: 1 + `foreground_weight` on figure pixels.

    The background of each image is its median border pixel (white for the
    picture world); a pixel is figure when any channel differs from it by more
    than `FOREGROUND_THRESHOLD`. Renormalising to mean 1 keeps the loss scale
    (and so the balance with the codebook terms) independent of figure size.
    """
    border = torch.cat([pixels[:, :, 0], pixels[:, :, -1], pixels[:, :, 1:-1, 0], pixels[:, :, 1:-1, -1]], dim=2)
    background = border.median(dim=2).values[:, :, None, None]
    figure = ((pixels - background).abs().amax(dim=1, keepdim=True) > FOREGROUND_THRESHOLD).float()
    weights = 1 + foreground_weight * figure
    return weights / weights.mean()


def vq_loss(model, pixels: torch.Tensor, beta: float = 0.25, foreground_weight: float = 1.5):
    """Figure-weighted reconstruction (MSE + L1) + codebook + beta * commitment, straight-through to the encoder."""
    latents = encode_latents(model, pixels)
    codes, indices = quantize(model, latents)
    codebook_loss = F.mse_loss(codes, latents.detach())
    commitment = F.mse_loss(latents, codes.detach())
    straight_through = latents + (codes - latents).detach()
    recon = decode_latents(model, straight_through)
    error = recon - pixels
    weights = pixel_weights(pixels, foreground_weight) if foreground_weight else torch.ones_like(pixels[:, :1])
    loss = (weights * error.square()).mean() + (weights * error.abs()).mean() + codebook_loss + beta * commitment
    return loss, indices, latents.detach()


class DeadCodeGuard:
    """Re-seeds codes that went unused for `interval` steps from recent encoder outputs.

    A dead code never receives gradient, so without this a short run ends up
    using a fraction of the codebook. Adam's moments for reseeded rows are
    cleared so stale momentum does not drag them straight back. Restarts stop
    for the last 10% of training so the final codes settle.
    """

    def __init__(self, model, optimizer, interval: int, generator: torch.Generator, keep_batches: int = 4):
        self.model, self.optimizer, self.interval, self.generator = model, optimizer, interval, generator
        self.usage = torch.zeros(model.quantize.embedding.num_embeddings, dtype=torch.long)
        self.recent: List[torch.Tensor] = []
        self.keep_batches = keep_batches
        self.restarted = 0

    def observe(self, step: int, total: int, indices: torch.Tensor, latents: torch.Tensor) -> None:
        """Count code usage and remember latents; restart dead codes at each interval."""
        self.usage += torch.bincount(indices.flatten(), minlength=self.usage.numel())
        self.recent = (self.recent + [latents.reshape(-1, latents.shape[-1])])[-self.keep_batches:]
        if self.interval and (step + 1) % self.interval == 0 and step + 1 < 0.9 * total:
            self.restarted += self._restart(torch.cat(self.recent))
            self.usage.zero_()

    def _restart(self, recent: torch.Tensor) -> int:
        dead = torch.nonzero(self.usage == 0).flatten()
        if dead.numel() == 0:
            return 0
        pick = torch.randint(0, recent.shape[0], (dead.numel(),), generator=self.generator)
        noise = 0.01 * torch.randn(dead.numel(), recent.shape[1], generator=self.generator)
        weight = self.model.quantize.embedding.weight
        with torch.no_grad():
            weight[dead] = F.normalize(recent[pick] + noise, dim=-1)
        logger.debug("re-seeded %d unused codes from recent encoder outputs", dead.numel())
        state = self.optimizer.state.get(weight, {})
        for key in ("exp_avg", "exp_avg_sq"):
            if key in state:
                state[key][dead] = 0
        return int(dead.numel())


def reconstruct(model, pixels: torch.Tensor, batch_size: int = 256):
    """Round trip through the *stock* transformers API (`encode` then `decode`): (pixels, codes)."""
    model.eval()
    outs, codes = [], []
    with torch.no_grad():
        for start in range(0, pixels.shape[0], batch_size):
            batch = pixels[start:start + batch_size]
            tokens = model.encode(batch).image_tokens.reshape(batch.shape[0], -1)
            outs.append(model.decode(tokens).clamp(-1, 1))
            codes.append(tokens)
    return torch.cat(outs), torch.cat(codes)


def evaluate(model, pixels: torch.Tensor) -> Optional[float]:
    """Held-out reconstruction MSE in the [-1, 1] model space (None without images)."""
    if pixels.shape[0] == 0:
        return None
    recon, _ = reconstruct(model, pixels)
    return float(F.mse_loss(recon, pixels.clamp(-1, 1)))


def codebook_stats(model, pixels: torch.Tensor) -> Dict[str, float]:
    """Distinct codes used on `pixels`, the fraction of the codebook, and the code perplexity (exp entropy)."""
    size = model.quantize.embedding.num_embeddings
    _, codes = reconstruct(model, pixels)
    counts = torch.bincount(codes.flatten(), minlength=size).double()
    probs = counts[counts > 0] / counts.sum()
    used = int((counts > 0).sum())
    return {"codes_used": used, "codebook_size": size, "codebook_usage": round(used / size, 4),
            "code_perplexity": round(float(torch.exp(-(probs * probs.log()).sum())), 1)}


def _lr_at(step: int, iters: int, lr: float, warmup: int) -> float:
    """Linear warm-up then cosine decay to 10%: stable start, fine finish in a few hundred steps."""
    if step < warmup:
        return lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, iters - warmup)
    return lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def train(model, train_pixels: torch.Tensor, eval_pixels: torch.Tensor, train_iters: int = 1000,
          micro_batch_size: int = 16, lr: float = 5e-3, seed: int = 1234, log_interval: int = 100,
          restart_interval: int = 25, beta: float = 0.25, foreground_weight: float = 1.5,
          on_log: Optional[Callable[[Dict[str, float]], None]] = None) -> Dict[str, float]:
    """Train `model` in place and return a summary (held-out MSE before/after, codebook usage, seconds).

    Deterministic on CPU for a given seed: batches come from a seeded
    generator and dead-code restarts draw from the same generator.
    """
    if train_pixels.shape[0] == 0:
        raise ValueError("no training images")
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    before = evaluate(model, eval_pixels)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr, betas=(0.9, 0.99))
    guard = DeadCodeGuard(model, optimizer, restart_interval, generator)
    warmup, start = max(1, min(20, train_iters // 10)), time.time()
    for step in range(train_iters):
        for group in optimizer.param_groups:
            group["lr"] = _lr_at(step, train_iters, lr, warmup)
        batch = train_pixels[torch.randint(0, train_pixels.shape[0], (micro_batch_size,), generator=generator)]
        model.train()
        loss, indices, latents = vq_loss(model, batch, beta, foreground_weight)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        guard.observe(step, train_iters, indices, latents)
        if on_log and log_interval and ((step + 1) % log_interval == 0 or step + 1 == train_iters):
            on_log({"iteration": step + 1, "loss": float(loss.detach()), "lr": optimizer.param_groups[0]["lr"],
                    "codes_in_batch": int(indices.unique().numel()), "seconds": time.time() - start})
    normalise_codebook(model)
    seconds = time.time() - start
    usage_pixels = eval_pixels if eval_pixels.shape[0] else train_pixels[:256]
    return {"eval_mse_before": before, "eval_mse_after": evaluate(model, eval_pixels),
            **codebook_stats(model, usage_pixels), "codes_restarted": guard.restarted,
            "train_images": int(train_pixels.shape[0]), "eval_images": int(eval_pixels.shape[0]),
            "train_iters": train_iters, "train_seconds": round(seconds, 2)}


def save(model, path: str) -> None:
    """`save_pretrained` with unit-norm codes; transformers 5 always writes safetensors (no pickle)."""
    import transformers

    transformers.utils.logging.disable_progress_bar()
    normalise_codebook(model)
    os.makedirs(path, exist_ok=True)
    model.save_pretrained(path)
    logger.info("saved %s (codebook %d, %d tokens per %d px image)", path, model.config.num_embeddings,
                model.config.num_patches ** 2, model.config.resolution)
