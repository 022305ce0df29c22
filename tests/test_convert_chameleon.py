"""Chameleon parents (`ChameleonForConditionalGeneration`: a Llama body with per-head q/k LayerNorm, optionally the
30B's "swin" norm placement, plus a VQ encoder) in the converter, the layer spec and the evaluator.

Parents are tiny random Chameleon models saved with transformers 5.24's `save_pretrained`, their norms
(per-head q/k weight and bias included) perturbed so that every head's norm differs. Checked: the
imported model's perplexity (tools/convert_checkpoint.py + tools/evaluate.py) equals transformers' at TP=1
and TP=2, with and without `swin_norm`; q/k norms stored per model-parallel shard (Lumina-mGPT, the
original checkpoints) import as transformers expands them; export -> `from_pretrained` round trips; a
JAM-Width of two Chameleon parents gives the same loss and gradients at TP=2 and TP=2+SP as at TP=1 with
each parent's norms in its own heads; JAM-Cross streams equal the parents at step 0.
"""

import json
import shutil

import pytest
import torch

from chameleon_helpers import PARENT_VOCABULARY_MAP, PARENT_VQ, make_chameleon
from eval_helpers import SEQ, eval_docs, expected_perplexity, write_documents
from megatron_jam.convert.common import ConvertError
from parent_helpers import convert, folder_tensors, load_logits, rel, rewrite_safetensors, state_of, token_ids
from tool_loader import load_tool

V, S, T = 100, 12, 60
"""Vocabulary rows, sequence length, and the text rows of the cross test (codes at [T, V))."""


def _from_pretrained(path):
    from transformers import ChameleonForConditionalGeneration

    return ChameleonForConditionalGeneration.from_pretrained(path).eval()


class RawLM:
    """transformers' Chameleon network without its last step: `ChameleonForConditionalGeneration.forward` sets the
    logits of every image token to the dtype's minimum (the released models were not to generate images); an
    image parent is scored on its network's own logits, `lm_head(model(ids))`, which is what we compute."""

    def __init__(self, model):
        self.model = model

    def __call__(self, ids):
        from types import SimpleNamespace

        with torch.no_grad():
            return SimpleNamespace(logits=self.model.lm_head(self.model.model(ids).last_hidden_state))


def _hf_logits(model, ids):
    return RawLM(model)(ids).logits


@pytest.fixture(scope="module")
def parents(tmp_path_factory):
    """{'pre' | 'swin': (hf folder, hf model, folder imported by tools/convert_checkpoint.py)} + shards."""
    import megatron_jam  # noqa: F401
    from megatron_jam.convert.checkpoint import ensure_single_rank

    ensure_single_rank()
    root = tmp_path_factory.mktemp("chameleon")
    tool = load_tool("convert_checkpoint")
    out = {}
    for i, kind in enumerate(("pre", "swin")):
        model = make_chameleon(root / kind, seed=i, swin_norm=kind == "swin")
        assert tool.main(["--method", "import", "--load", str(root / kind), "--save", str(root / f"mg_{kind}"),
                          "--seq-length", str(SEQ)]) == 0
        out[kind] = (root / kind, model, root / f"mg_{kind}")
    write_documents(str(root / "mm"), eval_docs())
    return root, out


def test_hf_names_and_per_head_norms_are_what_the_converter_reads(parents):
    _, found = parents
    keys = set(folder_tensors(found["pre"][0]))
    assert {"model.layers.1.self_attn.q_norm.weight", "model.layers.1.self_attn.k_norm.bias",
            "model.vqmodel.quantize.embedding.weight", "lm_head.weight"} <= keys
    q = found["pre"][1].model.layers[0].self_attn.q_norm.weight
    assert q.shape == (4, 8) and not torch.allclose(q[0], q[1]), "per-head norms must differ for the test to mean much"


# ------------------------------------------------------------------ peer parity: tools/evaluate.py vs transformers


def _evaluate(load, prefix, *extra):
    tool = load_tool("evaluate")
    return tool.evaluate(tool.build_parser().parse_args(["--load", str(load), "--data-path", prefix, *extra]))["ppl"]


def _evaluate_tp2(load, prefix):
    return _evaluate(load, prefix, "--tensor-model-parallel-size", "2")


@pytest.mark.parametrize("kind", ["pre", "swin"])
def test_perplexity_equals_transformers_at_tp1_and_tp2(single_rank, pool2, parents, kind):
    root, found = parents
    _, model, ckpt = found[kind]
    want = expected_perplexity(RawLM(model), eval_docs())
    errors = {"tp1": max(abs(_evaluate(ckpt, str(root / "mm"))[k] - want[k]) / want[k] for k in want)}
    for rank, ppl in enumerate(pool2.run(_evaluate_tp2, str(ckpt), str(root / "mm"))):
        errors[f"tp2 rank {rank}"] = max(abs(ppl[k] - want[k]) / want[k] for k in want)
    print(f"{kind}: relative perplexity errors", json.dumps(errors))
    assert all(e < 1e-4 for e in errors.values()), errors


def test_imported_logits_equal_transformers(single_rank, parents):
    for kind, (_, model, ckpt) in parents[1].items():
        ids = token_ids()
        assert rel(load_logits(str(ckpt), ids), _hf_logits(model, ids)) < 1e-4, kind
    state = state_of(parents[1]["swin"][2])
    assert "decoder.layers.0.self_attention.linear_proj.norm.weight" in state
    assert not any("input_layernorm" in k for k in state), "the swin layer has no pre-norms"


def test_norms_stored_per_model_parallel_shard_import_as_transformers_expands_them(single_rank, tmp_path):
    """Lumina-mGPT / the original checkpoints: q/k norm rows per shard `[mp, hd]`, each applied to its shard's
    heads; transformers' layout repeats them per head. Both must import to the same model."""
    model = make_chameleon(tmp_path / "a", seed=3, model_parallel_size=2)
    with torch.no_grad():  # one row per shard, as the original checkpoint holds
        for layer in model.model.layers:
            for norm in (layer.self_attn.q_norm, layer.self_attn.k_norm):
                for t in (norm.weight, norm.bias):
                    t.copy_(t[::t.shape[0] // 2].repeat_interleave(t.shape[0] // 2, dim=0))
    model.save_pretrained(tmp_path / "a")
    rewrite_safetensors(tmp_path / "a", lambda sd: {
        k: (v[:: v.shape[0] // 2].clone() if "_norm." in k and "self_attn" in k else v) for k, v in sd.items()})
    assert folder_tensors(tmp_path / "a")["model.layers.0.self_attn.q_norm.weight"].shape == (2, 8)
    convert("import", tmp_path / "mg", tmp_path / "a")
    ids = token_ids(seed=4)
    assert rel(load_logits(str(tmp_path / "mg"), ids), _hf_logits(model, ids)) < 1e-4
    rewrite_safetensors(tmp_path / "a", lambda sd: {
        k: (v[:1].clone() if k == "model.layers.1.self_attn.k_norm.weight" else v) for k, v in sd.items()})
    with pytest.raises(ConvertError, match=r"model.layers.1.self_attn.k_norm.weight has 1 rows.*model_parallel_size=2"):
        convert("import", tmp_path / "mg2", tmp_path / "a")


def test_export_round_trip(single_rank, parents, tmp_path):
    from megatron_jam.convert.export import export_hf

    for kind, (hf_dir, model, ckpt) in parents[1].items():
        export_hf(str(ckpt), str(tmp_path / kind))
        a, b = folder_tensors(hf_dir), folder_tensors(tmp_path / kind)
        assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a), kind
        back = _from_pretrained(tmp_path / kind)
        assert back.config.swin_norm == (kind == "swin") and back.config.vocabulary_map == PARENT_VOCABULARY_MAP
        ids = token_ids(seed=2)
        assert rel(_hf_logits(back, ids), _hf_logits(model, ids)) < 1e-4


# ------------------------------------------------------------------ JAM-Width: per-head norms of both parents


def _width_equivalence(load):
    from megatron_jam.models.kinds import load_model_config
    from megatron_jam.testing.equivalence import equivalence_body

    layouts = [{"tp": 2}, {"tp": 2, "sequence_parallel": True}]
    return equivalence_body(load_model_config(load).to_dict(), layouts, load=load)


def _local_q_norm(load):
    """This rank's q_layernorm weight of layer 0 at TP=2."""
    from megatron_jam.convert.checkpoint import load_checkpoint
    from megatron_jam.models.kinds import load_model_config, model_class
    from megatron_jam.parallel.initialize import initialize_model_parallel
    from megatron_jam.parallel.model import build_model_chunks, parallel_kwargs

    initialize_model_parallel(tp=2, seed=1)
    cfg = load_model_config(load)
    chunks = build_model_chunks(model_class(cfg), cfg, parallel_kwargs(tp=2), wrap_ddp=False)
    load_checkpoint(chunks, load)
    return chunks[0].decoder.layers[0].self_attention.q_layernorm.weight.detach().clone()


def test_width_of_two_chameleons_is_exact_under_tp2_and_sp(single_rank, pool2, parents, tmp_path):
    hf_a, model_a, _ = parents[1]["pre"]
    model_b = make_chameleon(tmp_path / "b", seed=5)
    convert("width", tmp_path / "w", hf_a, tmp_path / "b", width_init="average", seq_length=SEQ)
    q_a, q_b = (m.model.layers[0].self_attn.q_norm.weight.detach() for m in (model_a, model_b))
    k_a, k_b = (m.model.layers[0].self_attn.k_norm.bias.detach() for m in (model_a, model_b))
    state = state_of(tmp_path / "w")
    assert torch.equal(state["decoder.layers.0.self_attention.q_layernorm.weight"], torch.cat([q_a, q_b]))
    assert torch.equal(state["decoder.layers.0.self_attention.k_layernorm.bias"], torch.cat([k_a, k_b]))
    assert [torch.equal(w, q) for w, q in zip(pool2.run(_local_q_norm, str(tmp_path / "w")), (q_a, q_b))] == [True] * 2
    result = pool2.run(_width_equivalence, str(tmp_path / "w"))[0]
    print("width equivalence:", json.dumps(result["layouts"]))
    for layout, r in result["layouts"].items():
        assert r["loss_rel_err"] < 1e-5 and r["grad_worst_rel_err"] < 1e-4, (layout, r)
    q_grads = [k for k in result["keys"] if "q_layernorm" in k or "k_layernorm" in k]
    assert len(q_grads) == 4, q_grads  # q/k x weight/bias (layers stacked in one key): every per-head norm compared


# ------------------------------------------------------------------ JAM-Cross streams at step 0


def test_cross_streams_reproduce_both_chameleon_parents_at_step0(single_rank, parents, tmp_path):
    from megatron_jam.convert.checkpoint import build_single, load_checkpoint
    from megatron_jam.models.kinds import load_model_config

    hf_a, chat, _ = parents[1]["pre"]
    gen = make_chameleon(tmp_path / "gen", seed=6)
    convert("cross", tmp_path / "x", hf_a, tmp_path / "gen", cross_every=1, text_vocab_size=T)
    model = build_single(load_model_config(str(tmp_path / "x")))
    load_checkpoint([model], str(tmp_path / "x"))
    model.eval()
    pos = torch.arange(S).expand(2, S)
    text, image = token_ids(0, T, seed=5), token_ids(T, V, seed=6)
    with torch.no_grad():
        h_llm = model.forward_streams(text, pos)[0].transpose(0, 1)
        h_img = model.forward_streams(image, pos)[1].transpose(0, 1)
        assert rel(h_llm, chat.model(text).last_hidden_state) < 1e-4
        assert rel(h_img, gen.model(image).last_hidden_state) < 1e-4
    vq = json.loads((tmp_path / "x" / "image_tokenizer" / "config.json").read_text())
    assert vq["model_type"] == "chameleon_vqgan" and vq["num_embeddings"] == PARENT_VQ["num_embeddings"]


def test_swin_and_pre_norm_parents_are_refused_for_width(single_rank, parents, tmp_path):
    with pytest.raises(ConvertError, match="swin_norm: llm=False, img=True"):
        convert("width", tmp_path / "w", parents[1]["pre"][0], parents[1]["swin"][0])


def test_a_merge_carries_the_image_parents_vqgan_decoder(single_rank, parents, tmp_path):
    """An imported image parent whose image_tokenizer/ holds the project's decoder (tools/convert_image_tokenizer.py)
    passes it on to the merge, byte for byte."""
    src = tmp_path / "img"
    shutil.copytree(parents[1]["pre"][2], src)
    (src / "image_tokenizer" / "decoder.safetensors").write_bytes(b"decoder bytes stand-in")
    convert("cross", tmp_path / "x", parents[1]["pre"][0], src, cross_every=1, text_vocab_size=T)
    assert (tmp_path / "x" / "image_tokenizer" / "decoder.safetensors").read_bytes() == b"decoder bytes stand-in"
