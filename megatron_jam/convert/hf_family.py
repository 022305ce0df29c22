"""The rename engine shared by the Hugging Face family modules (`hf_llama`, `hf_opt`, `hf_emu3`, `hf_chameleon`).

A family module describes its checkpoint as data -- which HF tensor is which
Megatron tensor, which three HF tensors form the fused QKV, which two form a
gated MLP's fc1 -- and this engine turns that into pure, exactly invertible
`to_megatron` / `to_hf` functions over any subset of keys (one layer, the
embedding, the final norm), checking every shape against the config.
"""

import dataclasses
import re
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import Tensor

from megatron_jam.convert.common import ConvertError, megatron_shapes, pack_qkv, split_qkv
from megatron_jam.models.config import ParentConfig


@dataclass(frozen=True)
class HFFamily:
    """A Hugging Face architecture seen from Megatron (all names relative to a layer unless noted)."""

    name: str
    layer_prefix: str
    """HF prefix of layer N, with `{i}`."""
    layer_map: Callable[[ParentConfig], dict[str, str]]
    """1:1 layer tensors: HF name -> Megatron name."""
    qkv_map: Callable[[ParentConfig], list[tuple[tuple[str, str, str], str]]]
    """((HF q, k, v), Megatron fused QKV) for the weight and, with biases, the bias."""
    fc1_map: Callable[[ParentConfig], list[tuple[tuple[str, str], str]]]
    """((HF gate, up), Megatron fc1) for gated MLPs; empty otherwise."""
    top_map: Callable[[ParentConfig, bool], dict[str, dict[str, str]]]
    """part ('embedding' | 'final') -> {HF key: Megatron key} (depends on tied embeddings)."""
    hf_shape_fix: dict[str, Callable[[tuple], tuple]] = field(default_factory=dict)
    """Megatron key -> HF shape, where they differ (OPT's offset positions)."""
    to_megatron_fix: Callable[[dict], dict] = lambda sd: sd
    to_hf_fix: Callable[[dict, ParentConfig], dict] = lambda sd, p: sd
    read_fix: Callable[[str, Tensor, ParentConfig, str], Tensor] = lambda name, t, p, where: t
    """(HF layer-relative name, tensor, config, where) -> the tensor in the layout `layer_map` expects, before
    its shape is checked (Chameleon's q/k norms stored per model-parallel shard)."""

    def with_prefixes(self, name: str, prefixes: dict[str, str]) -> "HFFamily":
        """The same family under other HF key prefixes ({old: new}, first match wins), e.g. a Llama
        body nested in a multimodal model (`model.layers.0.` -> `text_model.model.layers.0.`)."""
        def move(key: str) -> str:
            old = next((o for o in prefixes if key.startswith(o)), None)
            return key if old is None else prefixes[old] + key[len(old):]

        top = self.top_map
        return dataclasses.replace(
            self, name=name, layer_prefix=move(self.layer_prefix),
            top_map=lambda p, tied: {part: {move(hk): mk for hk, mk in names.items()}
                                     for part, names in top(p, tied).items()})

    def hf_keys(self, part, p: ParentConfig, tied: bool) -> list[str]:
        """HF tensor names that make up one part ('embedding', layer index, 'final')."""
        if part in ("embedding", "final"):
            return list(self.top_map(p, tied)[part])
        pre = self.layer_prefix.format(i=part)
        names = list(self.layer_map(p))
        names += [n for group, _ in self.qkv_map(p) + self.fc1_map(p) for n in group]
        return [pre + n for n in names]

    def to_megatron(self, hf: dict[str, Tensor], p: ParentConfig, vocab_size: int, tied: bool,
                    where: str = "checkpoint") -> dict[str, Tensor]:
        """HF tensors (any whole parts) -> canonical Megatron tensors; shapes checked."""
        shapes = megatron_shapes(p, vocab_size)
        out, used = {}, set()
        tops = {k: v for part in self.top_map(p, tied).values() for k, v in part.items()}
        for hk, mk in tops.items():
            if hk in hf:
                _check(hk, hf[hk], self.hf_shape_fix.get(mk, lambda s: s)(shapes[mk]), where)
                out[mk], _ = hf[hk], used.add(hk)
        for i in sorted({int(m.group(1)) for k in hf if (m := self._layer_re().match(k))}):
            out |= self._layer_to_megatron(hf, i, p, shapes, used, where)
        unknown = sorted(set(hf) - used)
        if unknown:
            raise ConvertError(f"{where}: tensors {unknown[:5]} are not part of a {self.name} checkpoint "
                               f"with this config")
        return self.to_megatron_fix(out)

    def to_hf(self, mg: dict[str, Tensor], p: ParentConfig, tied: bool) -> dict[str, Tensor]:
        """Inverse of `to_megatron` (same subsets of keys)."""
        mg = self.to_hf_fix(dict(mg), p)
        out = {}
        for hk, mk in ((hk, mk) for part in self.top_map(p, tied).values() for hk, mk in part.items()):
            if mk in mg:
                out[hk] = mg[mk]
        layers = sorted({int(k.split(".")[2]) for k in mg if k.startswith("decoder.layers.")})
        for i in layers:
            out |= self._layer_to_hf(mg, i, p)
        return out

    def _layer_re(self) -> re.Pattern:
        return re.compile(re.escape(self.layer_prefix).replace(re.escape("{i}"), r"(\d+)"))

    def _layer_to_megatron(self, hf, i, p, shapes, used, where) -> dict[str, Tensor]:
        pre, mpre = self.layer_prefix.format(i=i), f"decoder.layers.{i}."
        hd, h, g, f = p.head_dim, p.num_attention_heads, p.query_groups, p.ffn_size
        get = _getter(hf, pre, used, where)
        out = {}
        for hk, mk in self.layer_map(p).items():
            t = self.read_fix(pre + hk, get(hk), p, where)
            _check(pre + hk, t, shapes[mk], where)
            out[mpre + mk] = t
        for (qn, kn, vn), mk in self.qkv_map(p):
            q, k, v = get(qn), get(kn), get(vn)
            rest = shapes[mk][1:]
            for name, t, rows in ((qn, q, h * hd), (kn, k, g * hd), (vn, v, g * hd)):
                _check(pre + name, t, (rows, *rest), where)
            out[mpre + mk] = pack_qkv(q, k, v, h, g)
        for (gn, un), mk in self.fc1_map(p):
            gate, up = get(gn), get(un)
            for name, t in ((gn, gate), (un, up)):
                _check(pre + name, t, (f, *shapes[mk][1:]), where)
            out[mpre + mk] = torch.cat([gate, up], dim=0)
        return out

    def _layer_to_hf(self, mg, i, p) -> dict[str, Tensor]:
        pre, mpre = self.layer_prefix.format(i=i), f"decoder.layers.{i}."
        out = {}
        for hk, mk in self.layer_map(p).items():
            out[pre + hk] = mg[mpre + mk]
        for (qn, kn, vn), mk in self.qkv_map(p):
            q, k, v = split_qkv(mg[mpre + mk], p.num_attention_heads, p.query_groups)
            out |= {pre + qn: q, pre + kn: k, pre + vn: v}
        for (gn, un), mk in self.fc1_map(p):
            gate, up = torch.chunk(mg[mpre + mk], 2, dim=0)
            out |= {pre + gn: gate.contiguous(), pre + un: up.contiguous()}
        return out


def _getter(hf: dict, pre: str, used: set, where: str) -> Callable[[str], Tensor]:
    def get(name: str) -> Tensor:
        key = pre + name
        if key not in hf:
            raise ConvertError(f"{where}: tensor {key} is missing")
        used.add(key)
        return hf[key]
    return get


def _check(name: str, t: Tensor, expected: tuple, where: str) -> None:
    if tuple(t.shape) != tuple(expected):
        raise ConvertError(f"{where}: tensor {name} has shape {tuple(t.shape)}, but the config "
                           f"(config.json) implies {tuple(expected)}")
