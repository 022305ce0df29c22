"""Shared pieces of every conversion: the error type, canonical keys, Megatron's QKV layout.

Canonical state dicts use the keys of a Megatron-Core `GPTModel` at TP=1
(`embedding.word_embeddings.weight`, `decoder.layers.N.self_attention.linear_qkv.weight`,
...), unpadded vocabulary rows. A parent is read in *parts* -- "embedding",
layer index N, "final" -- so converters stream one layer at a time.

Megatron's fused QKV weight is grouped: for each of the G query groups, the
rows of its H/G query heads, then its key head, then its value head
(`SelfAttention.get_query_key_value_tensors`). `pack_qkv` / `split_qkv` go
between that and separate q, k, v (HF layout); both are exact inverses.
"""

import abc
import re

import torch
from torch import Tensor

EMB = "embedding.word_embeddings.weight"
POS = "embedding.position_embeddings.weight"
OUT = "output_layer.weight"
FINAL = "decoder.final_layernorm."
HF_EXTRA = "hf_extra."
"""Prefix of tensors that HF has and Megatron does not (kept for an exact export)."""
QKV_W = "self_attention.linear_qkv.weight"
QKV_B = "self_attention.linear_qkv.bias"
FC1_W = "mlp.linear_fc1.weight"
FC1_B = "mlp.linear_fc1.bias"
Q_NORM = "self_attention.q_layernorm."
K_NORM = "self_attention.k_layernorm."
"""Chameleon's per-head q/k LayerNorm: weight and bias `[heads, head_dim]` / `[query groups, head_dim]`."""
PRE_NORMS = ("input_layernorm.", "pre_mlp_layernorm.")
SWIN_NORMS = ("self_attention.linear_proj.norm.", "mlp.linear_fc2.norm.")
"""The swin layer's norms after attention and after the MLP (`models.norms.post_norm_linear`)."""


class ConvertError(ValueError):
    """A conversion that cannot proceed; the message names the tensor, file and shapes involved."""


def check_finite(t: Tensor, name: str, where: str) -> None:
    """Refuse a parent tensor with NaN or Inf values: a merge would spread them silently into a model
    that trains to NaN (checked as each part is read, so the whole parent is never in memory)."""
    if t.is_floating_point() and not bool(torch.isfinite(t).all()):
        nan, inf = int(torch.isnan(t).sum()), int(torch.isinf(t).sum())
        raise ConvertError(f"{where}: tensor {name} has {nan} NaN and {inf} Inf values; refusing to convert it")


def layer_prefix(i: int) -> str:
    return f"decoder.layers.{i}."


def split_layer_key(key: str) -> tuple[int, str] | None:
    """`decoder.layers.3.mlp.linear_fc2.weight` -> (3, 'mlp.linear_fc2.weight'); None otherwise."""
    if not key.startswith("decoder.layers."):
        return None
    idx, _, rest = key[len("decoder.layers."):].partition(".")
    return int(idx), rest


def check_shape(name: str, t: Tensor, expected: tuple, where: str) -> None:
    if tuple(t.shape) != tuple(expected):
        raise ConvertError(f"{where}: tensor {name} has shape {tuple(t.shape)}, expected {tuple(expected)}")


def pack_qkv(q: Tensor, k: Tensor, v: Tensor, heads: int, groups: int) -> Tensor:
    """q [H*hd, ...], k and v [G*hd, ...] -> Megatron grouped layout [G*(H/G+2)*hd, ...]."""
    per, hd = heads // groups, k.shape[0] // groups
    rest = tuple(q.shape[1:])
    parts = [q.reshape(groups, per * hd, *rest), k.reshape(groups, hd, *rest), v.reshape(groups, hd, *rest)]
    return torch.cat(parts, dim=1).reshape(groups * (per + 2) * hd, *rest)


def split_qkv(w: Tensor, heads: int, groups: int) -> tuple[Tensor, Tensor, Tensor]:
    """Inverse of `pack_qkv`: Megatron grouped QKV -> (q, k, v), contiguous."""
    per = heads // groups
    hd = w.shape[0] // (groups * (per + 2))
    rest = tuple(w.shape[1:])
    g = w.reshape(groups, (per + 2) * hd, *rest)
    q = g[:, : per * hd].reshape(heads * hd, *rest).contiguous()
    k = g[:, per * hd: (per + 1) * hd].reshape(groups * hd, *rest).contiguous()
    v = g[:, (per + 1) * hd:].reshape(groups * hd, *rest).contiguous()
    return q, k, v


def rename(sd: dict[str, Tensor], old: str, new: str) -> dict[str, Tensor]:
    """Keys starting with `old` re-prefixed with `new` (others dropped)."""
    return {new + k[len(old):]: v for k, v in sd.items() if k.startswith(old)}


def megatron_shapes(p, vocab_size: int) -> dict[str, tuple]:
    """Expected shapes of a parent's canonical tensors: layer-relative keys and top-level keys."""
    d, hd, f = p.hidden_size, p.head_dim, p.ffn_size
    h, g = p.num_attention_heads, p.query_groups
    gated = p.gated
    shapes = {QKV_W: ((h + 2 * g) * hd, d), "self_attention.linear_proj.weight": (d, h * hd),
              FC1_W: (f * (2 if gated else 1), d), "mlp.linear_fc2.weight": (d, f),
              EMB: (vocab_size, d), OUT: (vocab_size, d), POS: (p.max_position_embeddings, d)}
    if p.add_bias_linear:
        shapes |= {QKV_B: ((h + 2 * g) * hd,), "self_attention.linear_proj.bias": (d,),
                   FC1_B: (f * (2 if gated else 1),), "mlp.linear_fc2.bias": (d,)}
    if p.learnable_norm:
        norms = [*(SWIN_NORMS if p.swin_norm else PRE_NORMS), FINAL]
        kinds = ["weight", "bias"] if p.family == "opt" else ["weight"]
        shapes |= {n + k: (d,) for n in norms for k in kinds}
    if p.qk_layernorm:
        shapes |= {norm + kind: (heads, hd) for norm, heads in ((Q_NORM, h), (K_NORM, g))
                   for kind in ("weight", "bias")}
    return shapes


def parent_parts(p) -> list:
    """The parts of a parent in streaming order: embedding, each layer, final."""
    return ["embedding", *range(p.num_layers), "final"]


_STACK_LAYER = re.compile(r"^(?:decoder|llm|img)\.layers\.(\d+)\.")
_CROSS_BLOCK = re.compile(r"^(?:llm|img)_cross\.layers\.(\d+)\.")


def part_of(key: str):
    """The part that makes an output key: 'embedding', a layer index, 'final', ('cross', K) for
    JAM-Cross's K-th cross-block pair, ('fusion',) for its fusion linear."""
    if m := _STACK_LAYER.match(key):
        return int(m[1])
    if m := _CROSS_BLOCK.match(key):
        return ("cross", int(m[1]))
    if key.startswith("embedding."):
        return "embedding"
    if key.startswith("fusion."):
        return ("fusion",)
    return "final"


class RowTable(abc.ABC):
    """A `[rows, ...]` table read a slice of rows at a time (`t[i:j]`, `t[i]`, `t[:]`), for the vocabulary
    tables, a parent's largest tensors, which a merge takes row by row (`VocabPlan.fuse`) and so need
    not hold whole. Subclasses set `name`, `shape`, `dtype` and say where rows come from (`_read_into`)."""

    name: str
    shape: torch.Size
    dtype: torch.dtype

    def __len__(self) -> int:
        return self.shape[0] if self.shape else 1

    def __getitem__(self, index) -> Tensor:
        if not self.shape:  # a scalar: t[:] is the whole tensor
            out = torch.empty((), dtype=self.dtype)
            self._read(out, 0)
            return out
        if isinstance(index, int):
            return self[index: index + 1][0] if index >= 0 else self[len(self) + index]
        start, stop, step = index.indices(len(self))
        if step != 1:
            raise IndexError(f"{self.name}: only contiguous row slices are read")
        out = torch.empty((max(0, stop - start), *self.shape[1:]), dtype=self.dtype)
        if out.numel():
            self._read(out, start)
        return out

    def read_into(self, out: Tensor) -> None:
        """All rows into `out[:len(self)]` (contiguous), e.g. the head of a zero-padded table."""
        if len(self):
            self._read(out[: len(self)], 0)

    def _read(self, out: Tensor, first_row: int) -> None:
        self._read_into(out, first_row)
        check_finite(out, self.name, getattr(self, "path", "parent"))

    @abc.abstractmethod
    def _read_into(self, out: Tensor, first_row: int) -> None:
        """Fill `out` (contiguous) with rows [first_row, first_row + len(out))."""
