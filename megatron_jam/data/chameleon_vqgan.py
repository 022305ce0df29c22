"""Chameleon's VQGAN decoder (codes -> pixels) and a safe reader of Meta's released tokenizer checkpoint.

Why this file: `transformers` ships `ChameleonVQVAE` for encoding only; the decoder of Chameleon's image
tokenizer exists only in Meta's release (`tokenizer/vqgan.ckpt` + `vqgan.yaml`, reused unchanged by Anole
and Lumina-mGPT). Meta's `chameleon/inference/vqgan.py` is Taming Transformers' `VQModel`, so the decoder
here is Taming's `Decoder` with the settings Chameleon uses: no timestep embedding (`temb_ch` 0, hence no
`temb_proj`), resampling with convolutions, no `tanh` at the end. It mirrors the encoder transformers
ships (`ChameleonVQVAEEncoder`): the same `base_channels`, `channel_multiplier`, `num_res_blocks` (+1 per
level, as Taming), `attn_resolutions`, `attn_type`, `latent_channels`, `dropout` and GroupNorm(32 groups,
eps 1e-6, affine) before every convolution block.

Parameter names are the original checkpoint's, so the released tensors load by name:
`decoder.conv_in`, `decoder.mid.{block_1,attn_1,block_2}`, `decoder.up.{i}.block.{j}.{norm1,conv1,norm2,
conv2,nin_shortcut}`, `decoder.up.{i}.attn.{j}.{norm,q,k,v,proj_out}`, `decoder.up.{i}.upsample.conv`,
`decoder.norm_out`, `decoder.conv_out` (level i = 0 is the full-resolution one, as Taming's `up.insert(0,
...)` orders them). transformers renames nothing in the rest: its conversion script
(`convert_chameleon_weights_to_hf.py`) copies every `vqgan.ckpt` tensor but `decoder.*` under
`model.vqmodel.` as is (`encoder.*`, `quant_conv.*`, `quantize.embedding.weight`, `post_quant_conv.*`).

A converted folder (`convert_tokenizer`, tools/convert_image_tokenizer.py) therefore holds `config.json`
(model_type `chameleon_vqgan`), `model.safetensors` (everything `ChameleonVQVAE.from_pretrained` loads,
post_quant_conv and the codebook included) and `decoder.safetensors` (the `decoder.*` tensors only, under
their original names). Decoding uses the codebook and post_quant_conv of the transformers model and the
decoder from `decoder.safetensors`: each tensor is stored once.

Safety: a `.ckpt` is a pickle. It is read with `torch.load(weights_only=True)` only, whose unpickler
accepts tensors and plain containers and refuses any other global without calling it (passed explicitly,
so `TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD` cannot switch it off); anything else in the file is a one-line
`ConvertError` naming the file, and the unpickled dict must hold tensors only.
"""

from __future__ import annotations

import json
import os
import pickle
from typing import Dict, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from megatron_jam.convert.common import ConvertError, check_shape
from megatron_jam.utils.logging import get_logger

logger = get_logger(__name__)

DECODER_FILE = "decoder.safetensors"
MODEL_FILE = "model.safetensors"
DECODER_PREFIX = "decoder."
HF_PREFIXES = ("encoder.", "quant_conv.", "quantize.", "post_quant_conv.")
"""The tensors transformers' `ChameleonVQVAE` holds (original names)."""
IGNORED_PREFIXES = ("loss.",)
"""Taming's training loss (LPIPS and discriminator) saved beside the model in a Lightning checkpoint."""
YAML_RENAMES = {"ch": "base_channels", "out_ch": "out_channels", "n_embed": "num_embeddings",
                "ch_mult": "channel_multiplier", "double_z": "double_latent", "z_channels": "latent_channels"}
"""Taming's `ddconfig` names -> `ChameleonVQVAEConfig` fields (the renames of transformers' conversion script)."""
CONFIG_FIELDS = ("embed_dim", "num_embeddings", "double_latent", "latent_channels", "resolution", "in_channels",
                 "base_channels", "channel_multiplier", "num_res_blocks", "attn_resolutions", "dropout",
                 "attn_type", "out_channels")
YAML_FIXED = {"resamp_with_conv": True, "give_pre_end": False, "tanh_out": False, "use_linear_attn": False}
"""Taming options the decoder implements only at Chameleon's values."""


def _group_norm(channels: int) -> nn.GroupNorm:
    """Taming's `Normalize`: 32 groups, eps 1e-6, affine (as transformers' encoder)."""
    return nn.GroupNorm(num_groups=32, num_channels=channels, eps=1e-6, affine=True)


class ResnetBlock(nn.Module):
    """Taming's `ResnetBlock` without timestep embedding: norm, swish, conv, twice, plus a 1x1 shortcut
    (`nin_shortcut`) when the width changes. Not in place, so it can be trained."""

    def __init__(self, in_channels: int, out_channels: int, dropout: float) -> None:
        super().__init__()
        self.norm1 = _group_norm(in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm2 = _group_norm(out_channels)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        if in_channels != out_channels:
            self.nin_shortcut = nn.Conv2d(in_channels, out_channels, 1)

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        return (self.nin_shortcut(x) if hasattr(self, "nin_shortcut") else x) + h


class AttnBlock(nn.Module):
    """Taming's single-head self-attention over the h*w positions, 1x1 convolutions for q, k, v, out."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.norm = _group_norm(channels)
        self.q, self.k, self.v = (nn.Conv2d(channels, channels, 1) for _ in range(3))
        self.proj_out = nn.Conv2d(channels, channels, 1)

    def forward(self, x: Tensor) -> Tensor:
        b, c, h, w = x.shape
        n = self.norm(x)
        q, k, v = (m(n).reshape(b, c, h * w).transpose(1, 2) for m in (self.q, self.k, self.v))  # [b, hw, c]
        out = F.scaled_dot_product_attention(q, k, v)  # softmax(q k^T / sqrt(c)) v, Taming's computation
        return x + self.proj_out(out.transpose(1, 2).reshape(b, c, h, w))


class Upsample(nn.Module):
    """Nearest-neighbour x2, then a 3x3 convolution (Taming's `Upsample(with_conv=True)`)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


def _make_attn(channels: int, attn_type: str) -> nn.Module:
    """The middle attention: a block for "vanilla", identity otherwise (as transformers' encoder)."""
    return AttnBlock(channels) if attn_type == "vanilla" else nn.Identity()


class ChameleonVQGANDecoder(nn.Module):
    """Latent [n, latent_channels, h, w] -> pixels [n, out_channels, h * 2**(L-1), w * 2**(L-1)] in about
    [-1, 1]: conv_in, middle (resnet, attention, resnet), L up levels from the coarsest (num_res_blocks + 1
    resnets each, attention where the level's resolution is in attn_resolutions, then x2 upsampling but
    at the finest), norm, swish, conv_out."""

    def __init__(self, config) -> None:
        super().__init__()
        mults, ch = tuple(config.channel_multiplier), int(config.base_channels)
        attn_res = set(config.attn_resolutions or ())
        levels, dropout = len(mults), float(config.dropout)
        block_in = ch * mults[-1]
        res = int(config.resolution) // 2 ** (levels - 1)
        self.conv_in = nn.Conv2d(int(config.latent_channels), block_in, 3, padding=1)
        self.mid = nn.Module()
        self.mid.block_1 = ResnetBlock(block_in, block_in, dropout)
        self.mid.attn_1 = _make_attn(block_in, config.attn_type)
        self.mid.block_2 = ResnetBlock(block_in, block_in, dropout)
        ups = []
        for i in reversed(range(levels)):
            up, block_out = nn.Module(), ch * mults[i]
            up.block = nn.ModuleList()
            up.attn = nn.ModuleList()
            for _ in range(int(config.num_res_blocks) + 1):
                up.block.append(ResnetBlock(block_in, block_out, dropout))
                block_in = block_out
                if res in attn_res and config.attn_type == "vanilla":
                    up.attn.append(AttnBlock(block_in))
            if i != 0:
                up.upsample = Upsample(block_in)
                res *= 2
            ups.insert(0, up)
        self.up = nn.ModuleList(ups)
        self.norm_out = _group_norm(block_in)
        self.conv_out = nn.Conv2d(block_in, int(getattr(config, "out_channels", None) or config.in_channels), 3,
                                  padding=1)

    def forward(self, z: Tensor) -> Tensor:
        h = self.mid.block_2(self.mid.attn_1(self.mid.block_1(self.conv_in(z))))
        for i in reversed(range(len(self.up))):
            level = self.up[i]
            for j, block in enumerate(level.block):
                h = block(h)
                if len(level.attn):
                    h = level.attn[j](h)
            if hasattr(level, "upsample"):
                h = level.upsample(h)
        return self.conv_out(F.silu(self.norm_out(h)))


def decode_codes(vq_model: nn.Module, decoder: ChameleonVQGANDecoder, codes: Tensor) -> Tensor:
    """Codes [n, h, w] -> pixels [n, C, H, W]: codebook rows of `vq_model.quantize.embedding`, channels
    first, `vq_model.post_quant_conv`, then the decoder (Meta's `get_codebook_entry` + `VQModel.decode`)."""
    latent = vq_model.quantize.embedding(codes).permute(0, 3, 1, 2).contiguous()
    return decoder(vq_model.post_quant_conv(latent))


# ----------------------------------------------------------------------------- config


def read_config(path: str):
    """`vqgan.yaml` (Taming layout: model.params with ddconfig) or a transformers config.json (a
    `chameleon_vqgan` config, or a whole `chameleon` model's whose `vq_config` is taken) ->
    `ChameleonVQVAEConfig`."""
    from transformers import ChameleonVQVAEConfig

    if not os.path.isfile(path):
        raise ConvertError(f"--config {path}: no such file")
    try:
        fields = _yaml_fields(path) if path.endswith((".yaml", ".yml")) else _json_fields(path)
        return ChameleonVQVAEConfig(**{k: v for k, v in fields.items() if k in CONFIG_FIELDS})
    except ConvertError:
        raise
    except Exception as e:  # yaml/json syntax, or a field of the wrong type (transformers' strict config)
        raise ConvertError(f"--config {path}: {type(e).__name__}: {_one_line(e)}") from e


def _yaml_fields(path: str) -> dict:
    """Taming's model.params, ddconfig flattened and renamed; unsupported decoder options refused."""
    import yaml

    with open(path) as f:
        doc = yaml.safe_load(f)
    try:
        params = dict(doc["model"]["params"])
        fields = {**params, **params.pop("ddconfig")}
    except (KeyError, TypeError) as e:
        raise ConvertError(f"--config {path}: not a Taming VQGAN yaml (no model.params.ddconfig: {e})") from e
    for key, value in YAML_FIXED.items():
        if key in fields and bool(fields[key]) != value:
            raise ConvertError(f"--config {path}: {key}={fields[key]} is not supported (Chameleon uses {value})")
    return {YAML_RENAMES.get(k, k): v for k, v in fields.items()}


def _json_fields(path: str) -> dict:
    """A transformers config.json's fields (a whole Chameleon model's `vq_config`)."""
    with open(path) as f:
        doc = json.load(f)
    if doc.get("model_type") == "chameleon":
        doc = doc.get("vq_config") or {}
    if doc.get("model_type", "chameleon_vqgan") != "chameleon_vqgan":
        raise ConvertError(f"--config {path}: model_type {doc.get('model_type')!r} is not chameleon_vqgan")
    return doc


def expected_shapes(config) -> Tuple[Dict[str, tuple], Dict[str, tuple]]:
    """(transformers' `ChameleonVQVAE` tensors, `decoder.*` tensors) -> shape, for `config`, built on the
    meta device (no memory, no initialisation)."""
    from transformers import ChameleonVQVAE

    with torch.device("meta"):
        hf = ChameleonVQVAE(config).state_dict()
    return {k: tuple(v.shape) for k, v in hf.items()}, decoder_shapes(config)


def decoder_shapes(config) -> Dict[str, tuple]:
    """`decoder.*` name -> shape for `config` (the original checkpoint's names), built on the meta device."""
    with torch.device("meta"):
        dec = ChameleonVQGANDecoder(config).state_dict()
    return {DECODER_PREFIX + k: tuple(v.shape) for k, v in dec.items()}


def check_tensors(tensors: Dict[str, Tensor], shapes: Dict[str, tuple], where: str, ignore: tuple = ()) -> None:
    """Every name of `shapes` is present with that shape and nothing else is (but names starting with one of
    `ignore`); else a one-line ConvertError naming `where` and the first offending tensor."""
    unknown = sorted(k for k in tensors if k not in shapes and not k.startswith(ignore))
    if unknown:
        raise ConvertError(f"{where}: tensor {unknown[0]} is not part of the VQGAN that the config describes "
                           f"({len(unknown)} such tensors)")
    for name, shape in shapes.items():
        if name not in tensors:
            raise ConvertError(f"{where}: tensor {name} is missing (expected shape {shape})")
        check_shape(name, tensors[name], shape, where)


# ----------------------------------------------------------------------------- checkpoint reading


def load_checkpoint_tensors(path: str) -> Dict[str, Tensor]:
    """All tensors of a tokenizer checkpoint: a `.safetensors` file, or a torch pickle (`.ckpt`, a Lightning
    dict whose `state_dict` holds them, or a plain name -> tensor dict) read with weights_only=True."""
    if not os.path.isfile(path):
        raise ConvertError(f"--load {path}: no such file")
    try:
        if path.endswith(".safetensors"):
            from safetensors.torch import load_file

            return load_file(path)
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise ConvertError(f"--load {path}: refused by torch.load(weights_only=True), which reads only tensors and "
                           f"plain containers ({_unpickler_reason(e)}); nothing in it was run") from e
    except Exception as e:  # any other failure to parse the file: report it on one line
        raise ConvertError(f"--load {path}: not a readable checkpoint ({type(e).__name__}: {_one_line(e)})") from e
    return _tensor_dict(obj, path)


def _tensor_dict(obj, path: str) -> Dict[str, Tensor]:
    """The name -> tensor dict of an unpickled checkpoint (its `state_dict` entry when there is one)."""
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict):
        raise ConvertError(f"--load {path}: holds a {type(obj).__name__}, expected a dict of tensors")
    for name, value in obj.items():
        if not isinstance(value, Tensor):
            raise ConvertError(f"--load {path}: entry {name!r} is a {type(value).__name__}, not a tensor")
    return dict(obj)


def _unpickler_reason(e: Exception) -> str:
    """The line of torch's multi-line weights_only message that names what was refused."""
    lines = [s.strip() for s in str(e).splitlines() if s.strip()]
    named = [s for s in lines if "GLOBAL" in s or "Unsupported" in s]
    reason = (named or lines or ["unpickling refused"])[0]
    return reason.replace("WeightsUnpickler error: ", "").split(". Please")[0]  # not torch's "allowlist it" advice


def _one_line(e: Exception) -> str:
    """An exception's message on one line (transformers' and YAML's span several)."""
    return " ".join(s.strip() for s in str(e).splitlines() if s.strip())[:300] or type(e).__name__


def split_checkpoint(tensors: Dict[str, Tensor], config, path: str) -> Tuple[Dict[str, Tensor], Dict[str, Tensor]]:
    """Checkpoint tensors -> (transformers' tensors, decoder tensors), every name and shape checked
    against `config`; `loss.*` (training losses) dropped; anything else unknown is an error."""
    hf_shapes, dec_shapes = expected_shapes(config)
    check_tensors(tensors, {**hf_shapes, **dec_shapes}, f"--load {path}", ignore=IGNORED_PREFIXES)
    ignored = [k for k in tensors if k.startswith(IGNORED_PREFIXES)]
    if ignored:
        logger.info("%s: dropped %d training-loss tensors (loss.*)", path, len(ignored))
    return _pick(tensors, hf_shapes), _pick(tensors, dec_shapes)


def _pick(tensors: Dict[str, Tensor], names) -> Dict[str, Tensor]:
    """The named tensors, contiguous (safetensors writes only contiguous tensors)."""
    return {k: tensors[k].contiguous() for k in names}


# ----------------------------------------------------------------------------- conversion and loading


def convert_tokenizer(load: str, config_path: str, save: str) -> dict:
    """Released tokenizer (checkpoint + config) -> a folder `VQImageTokenizer` loads with its decoder.
    Everything is checked before anything is written; `save` must not exist or be empty."""
    from safetensors.torch import save_file

    if os.path.isdir(save) and os.listdir(save):
        raise ConvertError(f"--save {save}: folder exists and is not empty")
    config = read_config(config_path)
    hf, dec = split_checkpoint(load_checkpoint_tensors(load), config, load)
    os.makedirs(save, exist_ok=True)
    config.save_pretrained(save)
    save_file(hf, os.path.join(save, MODEL_FILE), metadata={"format": "pt"})
    save_file(dec, os.path.join(save, DECODER_FILE), metadata={"format": "pt"})
    summary = {"save": save, "model_tensors": len(hf), "decoder_tensors": len(dec),
               "codebook": list(hf["quantize.embedding.weight"].shape), "resolution": int(config.resolution)}
    logger.info("converted %s -> %s: %d model + %d decoder tensors", load, save, len(hf), len(dec))
    return summary


def load_decoder(folder: str, config, device="cpu") -> ChameleonVQGANDecoder | None:
    """The decoder of a converted folder (`decoder.safetensors`, names and shapes checked against
    `config`); None when the folder has no decoder file (encoding only)."""
    from safetensors.torch import load_file

    path = os.path.join(folder, DECODER_FILE)
    if not os.path.isfile(path):
        return None
    tensors = load_file(path)
    check_tensors(tensors, decoder_shapes(config), path)
    with torch.device("meta"):  # no random initialisation: every parameter comes from the file
        decoder = ChameleonVQGANDecoder(config)
    decoder.load_state_dict({k[len(DECODER_PREFIX):]: v for k, v in tensors.items()}, assign=True)
    return decoder.to(device).eval()
