"""Emu3 parents (`Emu3ForConditionalGeneration`: a Llama body plus a VQ-VAE) in the converter.

Parents are tiny random Emu3 models saved with transformers 5.24's `save_pretrained`, which
writes the public `-hf` layout (`text_model.model.*`, `text_model.lm_head.weight`,
`vqmodel.*`); one test re-saves a parent under the in-memory names (`model.text_model.*`,
`lm_head.weight`, `model.vqmodel.*`). Checked: logits of the imported model against
transformers at TP=1 and TP=2, export -> `from_pretrained` round trips (import, uniform,
width), the extracted VQ folder against the original VQ-VAE's encode, JAM-Cross streams at
step 0, and the errors. Helpers come from tests/parent_helpers.py and tests/emu3_helpers.py.
"""

import contextlib
import json
import logging
import os
import re

import pytest
import torch

from emu3_helpers import PARENT_VQ, make_emu3
from megatron_jam.convert.common import ConvertError
from parent_helpers import (convert, folder_tensors, hf_logits, load_logits, make_llama, no_output, rel,
                            rewrite_safetensors, state_of, token_ids, tp2_logits)

V, S, T = 100, 12, 60
"""Vocabulary rows, sequence length, and the text rows of the cross test (codes at [T, V))."""
VQ_FILE_KEY = "vqmodel.quantize.embedding.weight"


def _from_pretrained(path):
    from transformers import Emu3ForConditionalGeneration

    return Emu3ForConditionalGeneration.from_pretrained(path).eval()


@contextlib.contextmanager
def _log_lines():
    """The megatron_jam log messages (INFO and up) emitted inside the block."""
    root, lines = logging.getLogger("megatron_jam"), []

    class Keep(logging.Handler):
        def emit(self, record):
            lines.append(record.getMessage())

    handler, level = Keep(logging.INFO), root.level
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    try:
        yield lines
    finally:
        root.removeHandler(handler)
        root.setLevel(level)


@pytest.fixture(scope="module")
def emu3(tmp_path_factory):
    """(hf folder, hf model, imported checkpoint, log lines of the import)."""
    import megatron_jam  # noqa: F401
    from megatron_jam.convert.checkpoint import ensure_single_rank

    ensure_single_rank()
    root = tmp_path_factory.mktemp("emu3")
    model = make_emu3(root / "hf")
    with _log_lines() as lines:
        convert("import", root / "mg", root / "hf")
    return root / "hf", model, root / "mg", lines


# ------------------------------------------------------------------ import


def test_save_pretrained_writes_the_hub_layout(emu3):
    keys = set(folder_tensors(emu3[0]))
    assert {"text_model.model.embed_tokens.weight", "text_model.lm_head.weight", "text_model.model.norm.weight",
            "text_model.model.layers.1.self_attn.q_proj.weight", VQ_FILE_KEY} <= keys
    assert not [k for k in keys if k.startswith(("model.", "lm_head."))]


def test_import_matches_transformers_at_tp1(single_rank, emu3):
    _, model, ckpt, _ = emu3
    ids = token_ids()
    assert rel(load_logits(str(ckpt), ids), hf_logits(model, ids)) < 1e-4
    record = json.loads((ckpt / "conversion.json").read_text())
    assert record["hf_config"]["model_type"] == "emu3" and record["vocab"]["vocab_size"] == V
    assert record["parents"][0].startswith("hf:Emu3ForConditionalGeneration:")


def test_import_and_width_match_at_tp2(single_rank, pool2, emu3, tmp_path):
    _, model, ckpt, _ = emu3
    ids = token_ids(seed=1)
    for got in pool2.run(tp2_logits, str(ckpt), ids):
        assert rel(got, hf_logits(model, ids)) < 1e-4
    make_emu3(tmp_path / "b", seed=7)
    convert("width", tmp_path / "w", emu3[0], tmp_path / "b", width_init="average")
    ref = load_logits(str(tmp_path / "w"), ids)
    for got in pool2.run(tp2_logits, str(tmp_path / "w"), ids):
        assert rel(got, ref) < 1e-5


def test_in_memory_key_names_import_the_same(single_rank, emu3, tmp_path):
    hf_dir, model, ckpt, _ = emu3
    make_emu3(tmp_path / "a")
    names = {k: v.detach().clone() for k, v in model.state_dict().items()}  # model.text_model.*, lm_head.*
    rewrite_safetensors(tmp_path / "a", lambda sd: names)
    convert("import", tmp_path / "mg", tmp_path / "a")
    a, b = state_of(ckpt), state_of(tmp_path / "mg")
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
    assert (tmp_path / "mg" / "image_tokenizer" / "model.safetensors").exists()


# ------------------------------------------------------------------ VQ-VAE and export


def test_extracted_vq_loads_and_encodes_like_the_original(single_rank, emu3):
    from transformers import Emu3VQVAE

    _, model, ckpt, lines = emu3
    folder = ckpt / "image_tokenizer"
    assert any(f"to {folder}" in line and "Emu3VQVAE" in line for line in lines), lines
    vq = Emu3VQVAE.from_pretrained(folder).eval()
    pixels = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(0)) * 2 - 1
    sizes = torch.tensor([[16, 16], [16, 16]])
    with torch.no_grad():
        got, ref = vq.encode(pixels, sizes), model.model.vqmodel.encode(pixels, sizes)
    torch.testing.assert_close(got.last_hidden_state, ref.last_hidden_state, rtol=0, atol=0)
    for g, r in zip(got.image_tokens, ref.image_tokens):
        assert torch.equal(g, r) and g.shape == (8, 8)
    assert len(torch.cat([t.flatten() for t in ref.image_tokens]).unique()) > 1, "a trivial encode proves nothing"


def test_export_round_trip(single_rank, emu3, tmp_path):
    from megatron_jam.convert.export import export_hf

    hf_dir, model, ckpt, _ = emu3
    with _log_lines() as lines:
        export_hf(str(ckpt), str(tmp_path / "hf"))
    assert any("back as vqmodel.*" in line for line in lines), lines
    a, b = folder_tensors(hf_dir), folder_tensors(tmp_path / "hf")
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a), "export gives back every tensor"
    back = _from_pretrained(tmp_path / "hf")
    ids = token_ids(seed=2)
    assert rel(hf_logits(back, ids), hf_logits(model, ids)) < 1e-4
    assert back.config.vq_config.codebook_size == PARENT_VQ["codebook_size"]


def test_without_vq_tensors_import_and_export_say_so(single_rank, tmp_path):
    from megatron_jam.convert.export import export_hf

    model = make_emu3(tmp_path / "a", vq=False)
    with _log_lines() as lines:
        convert("import", tmp_path / "mg", tmp_path / "a")
    assert any("images will need --image-tokenizer" in line for line in lines), lines
    assert not (tmp_path / "mg" / "image_tokenizer").exists()
    with _log_lines() as lines:
        export_hf(str(tmp_path / "mg"), str(tmp_path / "hf"))
    assert any("no vqmodel.* tensors" in line for line in lines), lines
    ids = token_ids(seed=3)
    assert rel(hf_logits(_from_pretrained(tmp_path / "hf"), ids), hf_logits(model, ids)) < 1e-4


# ------------------------------------------------------------------ merges of two Emu3 parents


@pytest.mark.parametrize("method", ["uniform", "width"])
def test_merge_of_two_emu3_parents_exports_and_loads(single_rank, emu3, tmp_path, method):
    from safetensors.torch import load_file

    from megatron_jam.convert.export import export_hf

    hf_a, _, ckpt_a, _ = emu3
    model_b = make_emu3(tmp_path / "b", seed=3)
    convert(method, tmp_path / "m", hf_a, tmp_path / "b", llm_weight=0.3)
    if method == "uniform":  # eq. 1 on every tensor, the vocabulary rows included (all text rows)
        convert("import", tmp_path / "mb", tmp_path / "b")
        a, b, u = state_of(ckpt_a), state_of(tmp_path / "mb"), state_of(tmp_path / "m")
        assert all(torch.equal(u[k], 0.3 * a[k] + 0.7 * b[k]) for k in u)
    vq = tmp_path / "m" / "image_tokenizer" / "model.safetensors"
    assert torch.equal(load_file(vq)["quantize.embedding.weight"], model_b.model.vqmodel.quantize.embedding.weight)
    export_hf(str(tmp_path / "m"), str(tmp_path / "hf"))
    back = _from_pretrained(tmp_path / "hf")
    assert back.config.text_config.hidden_size == (64 if method == "width" else 32)
    ids = token_ids(seed=4)
    assert rel(hf_logits(back, ids), load_logits(str(tmp_path / "m"), ids)) < 1e-4


def test_cross_streams_reproduce_both_emu3_parents_at_step0(single_rank, emu3, tmp_path):
    from megatron_jam.convert.checkpoint import build_single, load_checkpoint
    from megatron_jam.models.kinds import load_model_config

    hf_a, chat, _, _ = emu3
    gen = make_emu3(tmp_path / "gen", seed=5)
    convert("cross", tmp_path / "x", hf_a, tmp_path / "gen", cross_every=1, text_vocab_size=T)
    model = build_single(load_model_config(str(tmp_path / "x")))
    load_checkpoint([model], str(tmp_path / "x"))
    model.eval()
    pos = torch.arange(S).expand(2, S)
    text, image = token_ids(0, T, seed=5), token_ids(T, V, seed=6)  # rows from Chat / codes from Gen
    with torch.no_grad():
        h_llm = model.forward_streams(text, pos)[0].transpose(0, 1)
        h_img = model.forward_streams(image, pos)[1].transpose(0, 1)
        assert rel(h_llm, chat.model.text_model(text).last_hidden_state) < 1e-4
        assert rel(h_img, gen.model.text_model(image).last_hidden_state) < 1e-4
    emb = model.embedding.word_embeddings.weight
    assert torch.equal(emb[:T], chat.get_input_embeddings().weight.detach()[:T])
    assert torch.equal(emb[T:V], gen.get_input_embeddings().weight.detach()[T:])
    assert (tmp_path / "x" / "image_tokenizer" / "config.json").exists()


# ------------------------------------------------------------------ errors


@pytest.mark.parametrize("method", ["uniform", "width"])
def test_emu3_and_llama_parents_are_refused(single_rank, emu3, tmp_path, method):
    make_llama(tmp_path / "llama")  # a Llama body of the Emu3 parent's shape
    message = (f"needs parents of one family: {emu3[0]}/config.json is 'emu3', "
               f"{tmp_path}/llama/config.json is 'llama'")
    with pytest.raises(ConvertError, match=re.escape(message)):
        convert(method, tmp_path / "out", emu3[0], tmp_path / "llama")
    no_output(tmp_path, "out")


def test_missing_emu3_tensor_is_named(single_rank, tmp_path):
    make_emu3(tmp_path / "a")
    key = "text_model.model.layers.1.mlp.up_proj.weight"
    rewrite_safetensors(tmp_path / "a", lambda sd: {k: v for k, v in sd.items() if k != key})
    with pytest.raises(ConvertError, match=f"tensor {key} is missing"):
        convert("import", tmp_path / "out", tmp_path / "a")
    no_output(tmp_path, "out")
    rewrite_safetensors(tmp_path / "a", lambda sd: {k: v for k, v in sd.items() if k.startswith("vqmodel.")})
    with pytest.raises(ConvertError, match="no text-model tensors in an Emu3 checkpoint"):
        convert("import", tmp_path / "out", tmp_path / "a")


def test_unsupported_emu3_text_config_names_config_json(single_rank, tmp_path):
    make_emu3(tmp_path / "a")
    cfg_path = tmp_path / "a" / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["text_config"]["rope_parameters"] = {"rope_type": "linear", "factor": 2.0, "rope_theta": 1e6}
    cfg_path.write_text(json.dumps(cfg))
    with pytest.raises(ConvertError, match=re.escape(f"{cfg_path} text_config: unsupported Llama setting "
                                                     "rope type 'linear'")):
        convert("import", tmp_path / "out", tmp_path / "a")
    assert os.listdir(tmp_path) == ["a"]
