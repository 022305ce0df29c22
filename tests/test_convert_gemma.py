"""Gemma parents (convert/hf_gemma.py; Liquid's body), against transformers' `GemmaForCausalLM`.

The tiny Gemma has heads of their own width (4 x 16 over d 32, as Gemma-7B's 16 x 256 over 3072), GQA,
tied embeddings, perturbed zero-centred norms: the import's logits equal transformers' at TP=1 and TP=2,
export gives back every tensor and a config transformers rebuilds the same model from, JAM-Cross of two
Gemmas reproduces both parents at step 0 (embedding scale per stream), JAM-Width and JAM-Uniform run at
TP=2 as at TP=1, and the parameter count the trainer reports is the model's.
"""

import math
import types

import pytest
import torch

from parent_helpers import S, V, convert, folder_tensors, hf_logits, load_logits, make_gemma, state_of, token_ids, \
    tp2_logits


@pytest.fixture(scope="module")
def gemma(tmp_path_factory):
    """(hf folder, hf model, imported checkpoint)."""
    import megatron_jam  # noqa: F401
    from megatron_jam.convert.checkpoint import ensure_single_rank

    ensure_single_rank()
    root = tmp_path_factory.mktemp("gemma")
    model = make_gemma(root / "hf")
    convert("import", root / "mg", root / "hf")
    return root / "hf", model, root / "mg"


def test_import_matches_transformers_at_tp1_and_tp2(single_rank, pool2, gemma):
    from megatron_jam.models.kinds import load_model_config

    _, model, ckpt = gemma
    p = load_model_config(str(ckpt)).parent
    assert (p.act, p.norm_zero_centered, p.head_dim, p.attention_width) == ("geglu", True, 16, 64)
    assert p.embedding_multiplier == math.sqrt(32)
    ids = token_ids()
    want = hf_logits(model, ids)
    torch.testing.assert_close(load_logits(str(ckpt), ids), want, rtol=0, atol=1e-4)
    for got in pool2.run(tp2_logits, str(ckpt), ids):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-4)


def test_export_gives_back_every_tensor_and_the_model(single_rank, gemma, tmp_path):
    import json

    from transformers import AutoConfig, GemmaForCausalLM

    from megatron_jam.convert.export import export_hf

    hf_dir, model, ckpt = gemma
    export_hf(str(ckpt), str(tmp_path / "hf"))
    a, b = folder_tensors(hf_dir), folder_tensors(tmp_path / "hf")
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
    cfg = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert (cfg["model_type"], cfg["head_dim"], cfg["hidden_act"]) == ("gemma", 16, "gelu_pytorch_tanh")
    again = GemmaForCausalLM(AutoConfig.from_pretrained(tmp_path / "hf"))
    again.load_state_dict(b, strict=False)  # lm_head is the (tied) embedding
    ids = token_ids(seed=2)
    torch.testing.assert_close(hf_logits(again.eval(), ids), hf_logits(model, ids), rtol=0, atol=1e-5)


def test_cross_of_two_gemmas_reproduces_both_at_step0(single_rank, tmp_path):
    from megatron_jam.convert.checkpoint import build_single, load_checkpoint
    from megatron_jam.models.kinds import load_model_config
    from megatron_jam.models.param_count import model_params

    llm = make_gemma(tmp_path / "llm", seed=1)
    img = make_gemma(tmp_path / "img", seed=2, vocab=V + 60)
    convert("cross", tmp_path / "x", tmp_path / "llm", tmp_path / "img", cross_every=1)
    cfg = load_model_config(str(tmp_path / "x"))
    model = build_single(cfg)
    load_checkpoint([model], str(tmp_path / "x"))
    model.eval()
    assert model_params(cfg) == sum(t.numel() for t in model.parameters())
    pos = torch.arange(S).expand(2, S)
    text, image = token_ids(0, V, seed=5), token_ids(V, V + 60, seed=6)
    with torch.no_grad():
        h_llm = model.forward_streams(text, pos)[0].transpose(0, 1)
        h_img = model.forward_streams(image, pos)[1].transpose(0, 1)
        torch.testing.assert_close(h_llm, llm.model(text).last_hidden_state, rtol=0, atol=1e-4)
        torch.testing.assert_close(h_img, img.model(image).last_hidden_state, rtol=0, atol=1e-4)


def _width_and_uniform(root):
    make_gemma(root / "a", seed=3)
    make_gemma(root / "b", seed=4)
    convert("width", root / "w", root / "a", root / "b", width_init="average")
    convert("uniform", root / "u", root / "a", root / "b")
    return root / "w", root / "u"


def test_width_and_uniform_of_gemmas_at_tp2_equal_tp1(single_rank, pool2, tmp_path):
    from megatron_jam.convert.common import ConvertError
    from megatron_jam.convert.export import export_hf
    from megatron_jam.models.kinds import load_model_config

    width, uniform = _width_and_uniform(tmp_path)
    p = load_model_config(str(width)).parent
    assert (p.num_attention_heads, p.head_dim, p.embedding_multiplier) == (8, 16, math.sqrt(32))
    ids = token_ids(seed=3)
    for ckpt in (width, uniform):
        ref = load_logits(str(ckpt), ids)
        for got in pool2.run(tp2_logits, str(ckpt), ids):
            torch.testing.assert_close(got, ref, rtol=0, atol=1e-5, msg=str(ckpt))
    assert state_of(uniform)  # readable on one rank
    export_hf(str(uniform), str(tmp_path / "u_hf"))  # a Gemma again
    with pytest.raises(ConvertError, match="embedding multiplier of sqrt"):  # sqrt(64) would be wrong
        export_hf(str(width), str(tmp_path / "w_hf"))


def test_embedding_scale_is_rounded_to_the_weights_dtype():
    """As transformers' `GemmaTextScaledWordEmbedding`: sqrt(3072) = 55.4256 in fp32, 55.5 in bf16."""
    from megatron_jam.models.builders import embedding_scale
    from megatron_jam.models.config import ParentConfig

    p = ParentConfig(family="llama", hidden_size=3072, num_attention_heads=16, kv_channels=256,
                     embedding_multiplier=math.sqrt(3072))
    assert embedding_scale(p, types.SimpleNamespace(params_dtype=torch.bfloat16)) == 55.5
    assert embedding_scale(p, types.SimpleNamespace(params_dtype=torch.float32)) == pytest.approx(55.4256, abs=1e-4)
    assert embedding_scale(ParentConfig(), types.SimpleNamespace(params_dtype=torch.float32)) is None
    from megatron_jam.models.config import ConfigError

    with pytest.raises(ConfigError, match="embedding_multiplier"):  # learned positions: the two kinds would differ
        ParentConfig(family="opt", embedding_multiplier=2.0)


def test_decoding_a_gemma_equals_its_full_forward(single_rank, gemma):
    """The KV-cache decoder (eager and fixed-shape steps) runs the scaled embedding and the zero-centred
    norms as the model's own forward does: same greedy ids."""
    from decoding_helpers import FullForwardStepper

    from megatron_jam.data.vocab import VocabLayout
    from megatron_jam.inference.decoding import InterleavedGenerator
    from megatron_jam.inference.loading import load_model
    from megatron_jam.inference.sampling import SamplingParams

    layout = VocabLayout(text_vocab_size=40, codebook_size=16, tokens_per_image=4, num_sentinels=2)
    model, cfg = load_model(str(gemma[2]), 1)
    prompts = [[1, 2, 3, 4, 5], [6, 7, layout.break_id]]
    runs = [InterleavedGenerator(model, cfg, layout, stepper=FullForwardStepper(model)),
            InterleavedGenerator(model, cfg, layout), InterleavedGenerator(model, cfg, layout, decode_step="static")]
    ids = [[o.ids for o in g.generate(prompts, SamplingParams.greedy(3.0), 12)] for g in runs]
    assert ids[0] == ids[1] == ids[2] and len(set(ids[0][0] + ids[0][1])) >= 3


def test_bf16_logits_stay_within_one_bf16_step_of_transformers(single_rank, gemma):
    """A bf16 model (zero-centred norms computed in fp32, the embedding scale in bf16) stays within one bf16 step
    of transformers' Gemma in bf16 (the scale's rounding rule itself: the test below)."""
    from megatron_jam.convert.checkpoint import build_single, load_checkpoint
    from megatron_jam.models.kinds import load_model_config
    from megatron_jam.parallel.initialize import initialize_model_parallel

    _, model, ckpt = gemma
    initialize_model_parallel(1, 1, seed=1)
    cfg = load_model_config(str(ckpt))
    ours = build_single(cfg, bf16=True)
    load_checkpoint([ours], str(ckpt))
    ids = token_ids(seed=4)
    ref = type(model)(model.config).to(torch.bfloat16)
    ref.load_state_dict(model.state_dict())
    with torch.no_grad():
        got = ours.eval()(ids, torch.arange(S).expand_as(ids))[..., :cfg.vocab_size].float()
        want = ref.eval()(ids).logits.float()
    assert next(ours.parameters()).dtype == torch.bfloat16
    assert (got - want).abs().max() <= 2 ** -8 * max(1.0, float(want.abs().max()))
