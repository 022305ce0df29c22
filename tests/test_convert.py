"""Checkpoint conversion: peer parity with transformers (TP=1, TP=2), export round trips,
JAM-Uniform / JAM-Width / JAM-Cross weights and step-0 behaviour, and every promised error.

Parents are tiny random `LlamaForCausalLM` (GQA) / `OPTForCausalLM` models saved with
`save_pretrained` (safetensors; tests/parent_helpers.py); norms and biases are perturbed so that a swapped or
forgotten tensor cannot hide behind an init of ones or zeros.
"""

import json
import os
import shutil

import pytest
import torch

from megatron_jam.convert.common import EMB, FC1_W, OUT, QKV_W, ConvertError, split_qkv
from parent_helpers import (MAKERS, S, V, convert, folder_tensors, hf_logits, load_logits, make_llama, make_opt,
                            no_output, rewrite_safetensors, state_of, token_ids, tp2_logits)


def _hf_from_folder(cls, path):
    """`cls.from_pretrained(path)`, without from_pretrained: with megatron_jam's CPU layer installed,
    transformers 5's from_pretrained leaves RoPE's inv_freq buffers uninitialised (see the report)."""
    from transformers import AutoConfig

    model = cls(AutoConfig.from_pretrained(path))
    model.load_state_dict(folder_tensors(path), strict=False)
    return model.eval()


# ------------------------------------------------------------------ import parity


@pytest.fixture(scope="module")
def imported(tmp_path_factory):
    """family -> (hf folder, hf model, converted checkpoint)."""
    import megatron_jam  # noqa: F401
    from megatron_jam.convert.checkpoint import ensure_single_rank

    ensure_single_rank()
    root = tmp_path_factory.mktemp("imported")
    out = {}
    for fam, make in MAKERS.items():
        model = make(root / fam)
        convert("import", root / f"{fam}_mg", root / fam)
        out[fam] = (root / fam, model, root / f"{fam}_mg")
    return out


@pytest.mark.parametrize("family", ["llama", "opt"])
def test_import_matches_transformers_at_tp1(single_rank, imported, family):
    _, model, ckpt = imported[family]
    ids = token_ids()
    torch.testing.assert_close(load_logits(str(ckpt), ids), hf_logits(model, ids), rtol=0, atol=1e-4)


def test_import_matches_transformers_at_tp2(pool2, imported):
    ids = token_ids(seed=1)
    for family, (_, model, ckpt) in imported.items():
        for got in pool2.run(tp2_logits, str(ckpt), ids):
            torch.testing.assert_close(got, hf_logits(model, ids), rtol=0, atol=1e-4, msg=family)


@pytest.mark.parametrize("family", ["llama", "opt"])
def test_export_gives_back_the_original_tensors(single_rank, imported, tmp_path, family):
    from safetensors.torch import load_file
    from transformers import AutoConfig

    from megatron_jam.convert.export import export_hf

    hf_dir, _, ckpt = imported[family]
    export_hf(str(ckpt), str(tmp_path / "hf"))
    a, b = load_file(hf_dir / "model.safetensors"), folder_tensors(tmp_path / "hf")
    assert set(a) == set(b)
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert AutoConfig.from_pretrained(tmp_path / "hf").to_dict()["num_key_value_heads" if family == "llama"
                                                                  else "ffn_dim"] in (2, 64)


def test_megatron_checkpoint_is_a_parent(single_rank, imported, tmp_path):
    """A megatron-jam checkpoint reads as the same parent as its HF folder."""
    hf_dir, _, ckpt = imported["llama"]
    other = make_llama(tmp_path / "b", seed=5)
    convert("uniform", tmp_path / "u_hf", hf_dir, tmp_path / "b")
    convert("uniform", tmp_path / "u_mg", ckpt, tmp_path / "b")
    a, b = state_of(tmp_path / "u_hf"), state_of(tmp_path / "u_mg")
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
    del other


# ------------------------------------------------------------------ uniform


def test_uniform_of_a_model_with_itself_reproduces_it(single_rank, imported, tmp_path):
    hf_dir, model, _ = imported["llama"]
    convert("uniform", tmp_path / "u", hf_dir, hf_dir)
    ids = token_ids(seed=2)
    torch.testing.assert_close(load_logits(str(tmp_path / "u"), ids), hf_logits(model, ids), rtol=0, atol=1e-4)


@pytest.mark.parametrize("family", ["llama", "opt"])
def test_uniform_weights_are_eq1(single_rank, tmp_path, family):
    MAKERS[family](tmp_path / "a", seed=1)
    MAKERS[family](tmp_path / "b", seed=2, vocab=V + 28)  # the image model has 28 more rows
    convert("import", tmp_path / "ma", tmp_path / "a")
    convert("import", tmp_path / "mb", tmp_path / "b")
    convert("uniform", tmp_path / "u", tmp_path / "a", tmp_path / "b", llm_weight=0.3)
    a, b, u = state_of(tmp_path / "ma"), state_of(tmp_path / "mb"), state_of(tmp_path / "u")
    for k, t in u.items():
        if k in (EMB, OUT):
            torch.testing.assert_close(t[:V], 0.3 * a[k][:V] + 0.7 * b[k][:V], rtol=0, atol=0)
            assert torch.equal(t[V: V + 28], b[k][V: V + 28]), "rows only the image model has come from it"
        else:
            assert torch.equal(t, (0.3 * a[k] + 0.7 * b[k])), k
    record = json.loads((tmp_path / "u" / "conversion.json").read_text())
    assert record["vocab"]["text_rows"] == V and record["vocab"]["vocab_size"] == V + 28


# ------------------------------------------------------------------ width


def _layer(sd, i=0):
    pre = f"decoder.layers.{i}."
    return {k: v for k, v in sd.items() if k.startswith(pre)}


@pytest.mark.parametrize("init", ["copy", "average"])
def test_width_blocks_are_eq2_eq3(single_rank, tmp_path, init):
    from megatron_jam.convert.readers import open_parent
    from megatron_jam.convert.vocab import plan_vocab
    from megatron_jam.convert.width import width_parent, width_part

    make_llama(tmp_path / "a", seed=1)
    make_llama(tmp_path / "b", seed=2)
    pa, pb = open_parent(str(tmp_path / "a")), open_parent(str(tmp_path / "b"))
    plan = plan_vocab(V, V)
    la, lb = pa.read(0), pb.read(0)
    joint = width_part(la, lb, pa.cfg, plan, init)
    wp = width_parent(pa.cfg, pb.cfg)
    d, h, g = 32, 4, 2

    def blocks(w_joint, a, b):
        rows, cols = a.shape
        avg = (a + b) / 2
        assert torch.equal(w_joint[:rows, :cols], a) and torch.equal(w_joint[rows:, :cols], b)
        assert torch.equal(w_joint[:rows, cols:], a if init == "copy" else avg)
        assert torch.equal(w_joint[rows:, cols:], b if init == "copy" else avg)

    key = "decoder.layers.0."
    qj, kj, vj = split_qkv(joint[key + QKV_W], 2 * h, 2 * g)
    for j, (a, b) in zip((qj, kj, vj), zip(split_qkv(la[key + QKV_W], h, g), split_qkv(lb[key + QKV_W], h, g))):
        blocks(j, a, b)
    for j, a, b in zip(torch.chunk(joint[key + FC1_W], 2), torch.chunk(la[key + FC1_W], 2),
                       torch.chunk(lb[key + FC1_W], 2)):
        blocks(j, a, b)  # gate and up halves separately
    for name in ("self_attention.linear_proj.weight", "mlp.linear_fc2.weight"):
        blocks(joint[key + name], la[key + name], lb[key + name])
    for name in ("input_layernorm.weight", "pre_mlp_layernorm.weight"):
        assert torch.equal(joint[key + name], torch.cat([la[key + name], lb[key + name]]))
    emb = width_part(pa.read("embedding"), pb.read("embedding"), pa.cfg, plan, init)[EMB]
    assert torch.equal(emb, torch.cat([pa.read("embedding")[EMB][:], pb.read("embedding")[EMB][:]], dim=1))
    assert (wp.hidden_size, wp.num_attention_heads, wp.query_groups, wp.ffn_size) == (2 * d, 2 * h, 2 * g, 128)


@pytest.fixture(scope="module")
def width_ckpts(tmp_path_factory):
    import megatron_jam  # noqa: F401
    from megatron_jam.convert.checkpoint import ensure_single_rank

    ensure_single_rank()
    root = tmp_path_factory.mktemp("width")
    out = {}
    for fam, make in MAKERS.items():
        make(root / f"{fam}_a", seed=3)
        make(root / f"{fam}_b", seed=4)
        convert("width", root / f"{fam}_w", root / f"{fam}_a", root / f"{fam}_b", width_init="average")
        out[fam] = root / f"{fam}_w"
    return out


def test_width_tp2_logits_equal_tp1(single_rank, pool2, width_ckpts):
    ids = token_ids(seed=3)
    for fam, ckpt in width_ckpts.items():
        ref = load_logits(str(ckpt), ids)
        for got in pool2.run(tp2_logits, str(ckpt), ids):
            torch.testing.assert_close(got, ref, rtol=0, atol=1e-5, msg=fam)


def test_width_exports_as_a_wider_model(single_rank, width_ckpts, tmp_path):
    from transformers import LlamaForCausalLM

    from megatron_jam.convert.export import export_hf

    export_hf(str(width_ckpts["llama"]), str(tmp_path / "hf"))
    model = _hf_from_folder(LlamaForCausalLM, tmp_path / "hf")
    assert model.config.hidden_size == 64 and model.config.num_key_value_heads == 4
    ids = token_ids(seed=4)
    torch.testing.assert_close(hf_logits(model, ids), load_logits(str(width_ckpts["llama"]), ids),
                               rtol=0, atol=1e-4)


# ------------------------------------------------------------------ cross


@pytest.mark.parametrize("llm_family,img_family", [("llama", "opt"), ("opt", "opt")])
def test_cross_streams_reproduce_parents_at_step0(single_rank, tmp_path, llm_family, img_family):
    from megatron_jam.convert.checkpoint import build_single, load_checkpoint
    from megatron_jam.models.kinds import load_model_config

    llm = MAKERS[llm_family](tmp_path / "llm", seed=1)
    img = MAKERS[img_family](tmp_path / "img", seed=2, vocab=V + 60)
    convert("cross", tmp_path / "x", tmp_path / "llm", tmp_path / "img", cross_every=1)
    cfg = load_model_config(str(tmp_path / "x"))
    model = build_single(cfg)
    load_checkpoint([model], str(tmp_path / "x"))
    model.eval()
    pos = torch.arange(S).expand(2, S)
    text, image = token_ids(0, V, seed=5), token_ids(V, V + 60, seed=6)  # rows from the LLM / from the image model
    with torch.no_grad():
        h_llm = model.forward_streams(text, pos)[0].transpose(0, 1)
        h_img = model.forward_streams(image, pos)[1].transpose(0, 1)
        torch.testing.assert_close(h_llm, llm.model(text).last_hidden_state, rtol=0, atol=1e-4)
        torch.testing.assert_close(h_img, img.model(image).last_hidden_state, rtol=0, atol=1e-4)
    emb = model.embedding.word_embeddings.weight
    assert torch.equal(emb[:V], llm.get_input_embeddings().weight.detach())
    assert torch.equal(emb[V: V + 60], img.get_input_embeddings().weight.detach()[V:])


# ------------------------------------------------------------------ errors


def test_uniform_refuses_different_architectures(single_rank, tmp_path):
    make_llama(tmp_path / "a")
    make_opt(tmp_path / "b")
    with pytest.raises(ConvertError, match="same architecture.*family: llm='llama', img='opt'"):
        convert("uniform", tmp_path / "out", tmp_path / "a", tmp_path / "b")
    no_output(tmp_path, "out")


def test_cross_refuses_different_widths(single_rank, tmp_path):
    make_llama(tmp_path / "a")
    make_opt(tmp_path / "b", hidden_size=64, word_embed_proj_dim=64)
    with pytest.raises(ConvertError, match="llm.hidden_size=32, img.hidden_size=64"):
        convert("cross", tmp_path / "out", tmp_path / "a", tmp_path / "b")


def test_missing_tensor_is_named_and_nothing_is_written(single_rank, tmp_path):
    make_llama(tmp_path / "a")
    key = "model.layers.1.mlp.up_proj.weight"
    rewrite_safetensors(tmp_path / "a", lambda sd: {k: v for k, v in sd.items() if k != key})
    with pytest.raises(ConvertError, match=f"tensor {key} is missing"):
        convert("import", tmp_path / "out", tmp_path / "a")
    no_output(tmp_path, "out")


def test_shape_mismatch_names_tensor_and_both_shapes(single_rank, tmp_path):
    make_llama(tmp_path / "a")
    key = "model.layers.0.self_attn.k_proj.weight"
    rewrite_safetensors(tmp_path / "a", lambda sd: sd | {key: torch.zeros(24, 32)})
    with pytest.raises(ConvertError, match=rf"tensor {key} has shape \(24, 32\).*\(16, 32\)"):
        convert("import", tmp_path / "out", tmp_path / "a")
    no_output(tmp_path, "out")


def test_parents_with_different_layer_shapes_name_the_tensor(single_rank, tmp_path):
    from megatron_jam.convert.uniform import uniform_part
    from megatron_jam.convert.vocab import plan_vocab

    a = {"decoder.layers.0.mlp.linear_fc2.weight": torch.zeros(32, 64)}
    b = {"decoder.layers.0.mlp.linear_fc2.weight": torch.zeros(32, 96)}
    with pytest.raises(ConvertError, match=r"mlp.linear_fc2.weight: llm shape \(32, 64\) != img shape \(32, 96\)"):
        uniform_part(a, b, plan_vocab(V, V))


@pytest.mark.parametrize("kw,message", [
    (dict(do_layer_norm_before=False), "do_layer_norm_before=false"),
    (dict(word_embed_proj_dim=16), "word_embed_proj_dim=16 != hidden_size=32"),
])
def test_unsupported_opt_variants(single_rank, tmp_path, kw, message):
    make_opt(tmp_path / "a", **kw)
    with pytest.raises(ConvertError, match=message):
        convert("import", tmp_path / "out", tmp_path / "a")


def test_llama_rope_scaling_is_refused(single_rank, tmp_path):
    make_llama(tmp_path / "a")
    cfg_path = tmp_path / "a" / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["rope_parameters"] = {"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0}
    cfg_path.write_text(json.dumps(cfg))
    with pytest.raises(ConvertError, match="rope type 'linear'"):
        convert("import", tmp_path / "out", tmp_path / "a")


def test_text_vocabularies_must_match(single_rank, tmp_path):
    from megatron_jam.data.vocab import VocabLayout

    make_llama(tmp_path / "a", vocab=V + 8)
    make_llama(tmp_path / "b", seed=1, vocab=V)
    with pytest.raises(ConvertError, match="LLM has 108 embedding rows, more than the image model's 100"):
        convert("uniform", tmp_path / "out", tmp_path / "a", tmp_path / "b")
    layout = VocabLayout(text_vocab_size=120, codebook_size=8, tokens_per_image=4, num_sentinels=2)
    layout.to_json(tmp_path / "v.json")
    with pytest.raises(ConvertError, match="text vocabularies differ: the LLM has 108 embedding rows.*120 text"):
        convert("uniform", tmp_path / "out", tmp_path / "a", tmp_path / "b", vocab_layout=str(tmp_path / "v.json"))


def test_different_tokenizers_are_refused(single_rank, tmp_path):
    make_llama(tmp_path / "a")
    make_llama(tmp_path / "b", seed=1)
    (tmp_path / "a" / "tokenizer.model").write_bytes(b"one")
    (tmp_path / "b" / "tokenizer.model").write_bytes(b"two")
    with pytest.raises(ConvertError, match="text tokenizers differ"):
        convert("width", tmp_path / "out", tmp_path / "a", tmp_path / "b")


def test_pickles_are_never_loaded(single_rank, tmp_path):
    make_llama(tmp_path / "a")
    os.remove(tmp_path / "a" / "model.safetensors")
    (tmp_path / "a" / "pytorch_model.bin").write_bytes(b"not even a pickle")
    with pytest.raises(ConvertError, match="pickle files are never loaded"):
        convert("import", tmp_path / "out", tmp_path / "a")


def test_cli_errors_exit_2_and_leave_nothing(single_rank, tmp_path, capsys):
    from tool_loader import load_tool

    tool = load_tool("convert_checkpoint")
    make_llama(tmp_path / "a")
    assert tool.main(["--method", "import", "--load", str(tmp_path / "a"), "--save", str(tmp_path / "out"),
                      "--target-tensor-parallel-size", "3"]) == 2
    assert "num_attention_heads=4 is not divisible by tensor-model-parallel-size=3" in capsys.readouterr().err
    no_output(tmp_path, "out")
    os.makedirs(tmp_path / "full")
    (tmp_path / "full" / "x").write_text("x")
    assert tool.main(["--method", "import", "--load", str(tmp_path / "a"), "--save", str(tmp_path / "full")]) == 2
    assert "exists and is not empty" in capsys.readouterr().err
    assert tool.main(["--method", "uniform", "--load", str(tmp_path / "a"), "--save", str(tmp_path / "o")]) == 2
    assert tool.main(["--method", "import", "--load", str(tmp_path / "a"), "--save", str(tmp_path / "ok")]) == 0
    assert json.loads(capsys.readouterr().out)["method"] == "import"
    shutil.rmtree(tmp_path / "ok")
