"""JAM-Cross model properties: causality of both streams, step-0 equality with the parents,
parameter counts (paper Table 4) and the promised configuration errors."""

import dataclasses

import pytest
import torch

from megatron_jam.models.config import ConfigError, JamCrossConfig, ParentConfig, validate_parallel
from megatron_jam.models.param_count import jam_cross_params, parent_params, table4_rows

OPT = ParentConfig(family="opt", num_layers=4, hidden_size=32, num_attention_heads=4, max_position_embeddings=64)
LLAMA = ParentConfig(family="llama", num_layers=4, hidden_size=32, num_attention_heads=4, num_query_groups=2,
                     add_bias_linear=False, max_position_embeddings=64)
CM3 = ParentConfig(family="opt", num_layers=4, hidden_size=32, num_attention_heads=4, add_bias_linear=False,
                   learnable_norm=False, max_position_embeddings=64)


def _model(cfg: JamCrossConfig):
    from megatron_jam.models.jam_cross import JamCrossModel

    torch.manual_seed(0)
    return JamCrossModel(cfg).eval()


def _inputs(cfg, b=2, s=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, cfg.vocab_size, (b, s), generator=g)
    return ids, torch.arange(s).expand(b, s).contiguous()


@pytest.mark.parametrize("llm,img", [(OPT, LLAMA), (CM3, CM3)], ids=["opt+llama", "cm3leon"])
def test_changing_token_j_changes_nothing_before_j(single_rank, llm, img):
    cfg = JamCrossConfig(llm=llm, img=img, vocab_size=100, cross_every=1, cross_zero_init=False)
    model = _model(cfg)
    ids, pos = _inputs(cfg)
    j = 7
    ids2 = ids.clone()
    ids2[:, j] = (ids[:, j] + 1) % cfg.vocab_size
    with torch.no_grad():
        a_llm, a_img = model.forward_streams(ids, pos)  # [s, b, h]
        b_llm, b_img = model.forward_streams(ids2, pos)
        logits_a, logits_b = model(ids, pos), model(ids2, pos)  # [b, s, V]
    for a, b in ((a_llm, b_llm), (a_img, b_img)):
        assert torch.equal(a[:j], b[:j])
        assert not torch.allclose(a[j:], b[j:])  # the change does propagate forward
    assert torch.equal(logits_a[:, :j], logits_b[:, :j])
    assert not torch.allclose(logits_a[:, j:], logits_b[:, j:])


def _parent_state(jam_sd: dict, stream: str) -> dict:
    """The standalone parent's GPTModel state dict carried by one JAM-Cross stream."""
    out = {}
    for k, v in jam_sd.items():
        if k.startswith(f"{stream}.") and not k.startswith(f"{stream}_"):
            out["decoder." + k[len(stream) + 1:]] = v
    out["embedding.word_embeddings.weight"] = jam_sd["embedding.word_embeddings.weight"]
    pos = f"embedding.{stream}_position_embeddings.weight"
    if pos in jam_sd:
        out["embedding.position_embeddings.weight"] = jam_sd[pos]
    return out


@pytest.mark.parametrize("llm,img", [(OPT, LLAMA), (CM3, CM3), (LLAMA, OPT)],
                         ids=["opt+llama", "cm3leon", "llama+opt"])
def test_step0_streams_equal_parents(single_rank, llm, img):
    from megatron_jam.models.builders import build_parent_gpt

    cfg = JamCrossConfig(llm=llm, img=img, vocab_size=100, cross_every=2)
    model = _model(cfg)
    sd = {k: v for k, v in model.state_dict().items() if "_extra_state" not in k}
    ids, pos = _inputs(cfg)
    with torch.no_grad():
        streams = dict(zip(("llm", "img"), model.forward_streams(ids, pos)))
    for name, p in (("llm", llm), ("img", img)):
        parent = build_parent_gpt(p, cfg.padded_vocab_size).eval()
        missing, unexpected = parent.load_state_dict(_parent_state(sd, name), strict=False)
        assert not [k for k in missing if "_extra_state" not in k and "output_layer" not in k], missing
        assert not unexpected, unexpected
        captured = {}
        parent.decoder.register_forward_hook(lambda m, i, o: captured.setdefault("h", o))
        with torch.no_grad():
            parent(ids, pos, attention_mask=None)
        torch.testing.assert_close(streams[name], captured["h"], rtol=1e-6, atol=1e-6)


def test_cross_blocks_change_streams_once_trained(single_rank):
    """The zero init is the only reason the streams equal the parents: a non-zero cross block mixes them."""
    cfg = JamCrossConfig(llm=OPT, img=OPT, vocab_size=100, cross_every=2)
    model = _model(cfg)
    ids, pos = _inputs(cfg)
    with torch.no_grad():
        before = model.forward_streams(ids, pos)[0].clone()
        model.llm_cross.layers[0].cross_attention.linear_proj.weight.normal_()
        after = model.forward_streams(ids, pos)[0]
    assert not torch.allclose(before, after)


def test_table4_sizes_within_5_percent():
    paper = {"none": 13, "k=1": 26, "k=2": 19, "k=4": 16}
    ours = table4_rows()
    for row, billions in paper.items():
        assert abs(ours[row] - billions) / billions <= 0.05, (row, ours[row], billions)


CHAMELEON = dataclasses.replace(LLAMA, qk_layernorm=True)
SWIN = dataclasses.replace(CHAMELEON, swin_norm=True)


@pytest.mark.parametrize("llm,img,tied", [(OPT, LLAMA, True), (CM3, CM3, True), (LLAMA, OPT, False),
                                          (CHAMELEON, SWIN, False)])
@pytest.mark.parametrize("k", [1, 2, 4])
def test_param_count_matches_modules(single_rank, llm, img, tied, k):
    from megatron_jam.models.builders import build_parent_gpt

    cfg = JamCrossConfig(llm=llm, img=img, vocab_size=100, cross_every=k, share_embeddings_and_output_weights=tied)
    model = _model(cfg)
    assert sum(p.numel() for p in model.parameters()) == jam_cross_params(cfg)
    parent = build_parent_gpt(llm, cfg.padded_vocab_size, share_embeddings_and_output_weights=tied)
    assert sum(p.numel() for p in parent.parameters()) == parent_params(llm, cfg.padded_vocab_size, tied)


def _cfg(**kw):
    return JamCrossConfig(llm=kw.pop("llm", OPT), img=kw.pop("img", OPT), **kw)


@pytest.mark.parametrize("make,layout,message", [
    (lambda: _cfg(), dict(tp=3), "num_attention_heads=4 is not divisible by tensor-model-parallel-size=3"),
    (lambda: _cfg(llm=ParentConfig(family="opt", num_layers=4, hidden_size=32, num_attention_heads=8,
                                   ffn_hidden_size=100),
                  img=ParentConfig(family="opt", num_layers=4, hidden_size=32, num_attention_heads=8,
                                   ffn_hidden_size=100)),
     dict(tp=8), "ffn_hidden_size=100 is not divisible by tensor-model-parallel-size=8"),
    (lambda: _cfg(), dict(pp=3), "num_layers=4 is not divisible by the pipeline stages"),
    (lambda: _cfg(cross_every=2), dict(pp=4), "not a multiple of cross_every=2"),
    (lambda: _cfg(), dict(tp=1, sequence_parallel=True), "--sequence-parallel needs"),
    (lambda: _cfg(llm=LLAMA), dict(tp=4), "num_query_groups=2 is not divisible by tensor-model-parallel-size=4"),
])
def test_invalid_parallel_layouts_raise(make, layout, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        validate_parallel(make(), **layout)


@pytest.mark.parametrize("kw,message", [
    (dict(cross_every=3), "cross_every=3 must be >= 1 and divide num_layers=4"),
    (dict(img=ParentConfig(num_layers=4, hidden_size=64, num_attention_heads=4)),
     "llm.hidden_size=32, img.hidden_size=64"),
    (dict(img=ParentConfig(num_layers=6, hidden_size=32, num_attention_heads=4)),
     "llm.num_layers=4, img.num_layers=6"),
])
def test_unfusable_parents_raise(kw, message):
    with pytest.raises(ConfigError, match=message):
        _cfg(**kw)


def test_bad_parent_shapes_raise():
    with pytest.raises(ConfigError, match="hidden_size=30 is not divisible by num_attention_heads=4"):
        ParentConfig(hidden_size=30, num_attention_heads=4)
    with pytest.raises(ConfigError, match="num_attention_heads=4 is not divisible by num_query_groups=3"):
        ParentConfig(hidden_size=32, num_attention_heads=4, num_query_groups=3)


def test_config_json_round_trip(tmp_path):
    cfg = _cfg(llm=LLAMA, img=CM3, cross_every=4, vocab_size=1000)
    cfg.to_json(tmp_path / "model_config.json")
    assert JamCrossConfig.from_json(tmp_path / "model_config.json") == cfg
    with pytest.raises(ConfigError, match="unknown JamCrossConfig fields"):
        JamCrossConfig.from_dict(cfg.to_dict() | {"hidden": 3})
