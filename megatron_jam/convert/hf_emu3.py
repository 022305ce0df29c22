"""`Emu3ForConditionalGeneration` (BAAI Emu3: Stage1, Chat, Gen) <-> Megatron-Core GPT, plus its VQ-VAE.

Emu3's language model is a plain Llama body (GQA, RoPE base 1e6, no biases,
RMSNorm, SwiGLU, untied lm_head), so the tensor mapping *is* `hf_llama`'s
under other prefixes, and `text_config` goes through `hf_llama.parent_config`
(same refusals). Two key layouts are read (tests/test_convert_emu3.py):

- what `save_pretrained` writes in transformers 5.24 and what the public
  `-hf` repositories hold (transformers reverses its load-time renaming on
  save): `text_model.model.*`, `text_model.lm_head.weight`, `vqmodel.*`;
- the in-memory module names: `model.text_model.*`, `lm_head.weight`,
  `model.vqmodel.*` (a `state_dict()` saved as it is).

Export writes the first. The VQ-VAE (`vqmodel.*`) is no part of the Megatron
model: `vq.py` copies it into `SAVE/image_tokenizer/` on import and back on
export. Image codes live inside the vocabulary (151,854 + c in the released
models), so the vocabulary rows are taken whole, as for any parent.
"""

from megatron_jam.convert import hf_llama
from megatron_jam.convert.common import ConvertError
from megatron_jam.convert.hf_family import HFFamily
from megatron_jam.convert.vq import ImageTokenizerSource, embedded_image_tokenizer, export_image_tokenizer
from megatron_jam.models.config import ParentConfig

ARCHITECTURE = "Emu3ForConditionalGeneration"
VQ_MODEL_TYPE = "emu3_vqgan"
VQ_FILE = "model-vqmodel.safetensors"

LAYOUTS = {
    # name: (text-model prefixes for hf_llama's `model.` / `lm_head.` keys, VQ prefix)
    "save_pretrained": ({"model.": "text_model.model.", "lm_head.": "text_model.lm_head."}, "vqmodel."),
    "in-memory": ({"model.": "model.text_model.", "lm_head.": "lm_head."}, "model.vqmodel."),
}


def _family(layout: str) -> HFFamily:
    name = ARCHITECTURE if layout == "save_pretrained" else f"{ARCHITECTURE} ({layout} names)"
    return hf_llama.FAMILY.with_prefixes(name, LAYOUTS[layout][0])


LAYOUT_FAMILIES = {layout: _family(layout) for layout in LAYOUTS}
FAMILY = LAYOUT_FAMILIES["save_pretrained"]
"""The layout export writes (what `from_pretrained` reads without renaming)."""

TEXT_DEFAULTS = dict(vocab_size=184622, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                     num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=9216,
                     rms_norm_eps=1e-5, rope_theta=1000000.0, hidden_act="silu")
"""`Emu3TextConfig`'s defaults (transformers 5.24), for fields a config.json leaves out."""
TEXT_SHAPE = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
              "num_key_value_heads", "max_position_embeddings", "rms_norm_eps", "rope_parameters",
              "tie_word_embeddings", "hidden_act")


def parent_config(hf: dict, where: str = "config.json") -> tuple[ParentConfig, int, bool]:
    """HF Emu3Config dict -> (ParentConfig of its text model, vocab_size, tied); ConvertError for what
    Megatron cannot express (hf_llama's checks, on `text_config`)."""
    text = hf.get("text_config")
    if not isinstance(text, dict):
        raise ConvertError(f"{where}: an Emu3 config needs a text_config object, got {text!r}")
    tied = bool(hf.get("tie_word_embeddings", False))  # Emu3ForConditionalGeneration ties by the top-level flag
    p, vocab, _ = hf_llama.parent_config(TEXT_DEFAULTS | text, where=f"{where} text_config")
    return p, vocab, tied


def hf_config(p: ParentConfig, vocab_size: int, tied: bool, base: dict | None = None) -> dict:
    """An Emu3Config dict for `p`: `base`'s fields (vq_config, vocabulary_map, token ids) kept, the text
    model's shape from `p`."""
    llama = hf_llama.hf_config(p, vocab_size, tied)  # refuses what a Llama body cannot hold
    base = dict(base or {})
    text = {k: v for k, v in (base.get("text_config") or {}).items() if k not in ("rope_theta", "rope_scaling")}
    text |= {k: llama[k] for k in TEXT_SHAPE} | {"model_type": "emu3_text_model"}
    return base | {"text_config": text, "tie_word_embeddings": tied, "model_type": "emu3",
                   "architectures": [ARCHITECTURE]}


def merge_base(hf: dict) -> dict:
    """What a merge records for export: the whole config (export takes the shape from the model)."""
    return dict(hf)


def family_for(keys, where: str, hf: dict | None = None) -> HFFamily:
    """The key layout of a checkpoint holding `keys`; ConvertError when it is neither."""
    found = [name for name, (prefixes, _) in LAYOUTS.items() if any(k.startswith(prefixes["model."]) for k in keys)]
    if len(found) != 1:
        expected = " or ".join(f"{p['model.']}* ({n})" for n, (p, _) in LAYOUTS.items())
        what = "both layouts" if found else "no text-model tensors"
        raise ConvertError(f"{where}: {what} in an Emu3 checkpoint (expected {expected})")
    return LAYOUT_FAMILIES[found[0]]


def image_tokenizer(hf: dict, files: dict[str, str], path: str) -> ImageTokenizerSource | None:
    """The VQ-VAE stored with the language model (`vqmodel.*` or `model.vqmodel.*`), or None."""
    return embedded_image_tokenizer(hf, files, path, [vq for _, vq in LAYOUTS.values()], VQ_MODEL_TYPE, "Emu3VQVAE")


def export_extras(load: str, out_dir: str, hf_cfg: dict) -> tuple[dict, dict[str, str]]:
    """Put the VQ-VAE back as vqmodel.* (`vq.export_image_tokenizer`)."""
    return export_image_tokenizer(load, out_dir, hf_cfg, "vqmodel.", VQ_FILE, ARCHITECTURE)
