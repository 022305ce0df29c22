"""Mixed-modal decoding: CFG formula, vocabulary masks, the state machine (scripted logits), and on
converted JAM-Cross / JAM-Width / JAM-Uniform checkpoints: greedy decoding with the KV cache equals
decoding without it (the model's own full forward, prompt by prompt) and TP=2 equals TP=1."""

import pytest
import torch
from hypothesis import given, settings, strategies as st

from decoding_helpers import FullForwardStepper
from megatron_jam.data.vocab import VocabLayout
from megatron_jam.inference.decoding import InterleavedGenerator
from megatron_jam.inference.sampling import SamplingParams, cfg_combine, top_p_filter

LAYOUT = VocabLayout(text_vocab_size=40, codebook_size=16, tokens_per_image=4, num_sentinels=2)
V = LAYOUT.vocab_size  # 62
TPI = LAYOUT.tokens_per_image
BRK, EOS, MASK = LAYOUT.break_id, LAYOUT.eos_id, LAYOUT.mask_id
IMG0 = LAYOUT.image_offset


def _Cfg(seq_length=64, vocab_size=V):
    """A single-stack model config of 64 positions and 128 padded vocabulary rows (the generator reads only that)."""
    from megatron_jam.models.config import JamGPTConfig, ParentConfig

    return JamGPTConfig(parent=ParentConfig(max_position_embeddings=64), vocab_size=vocab_size, seq_length=seq_length)


class ScriptedStepper:
    """Logits from a function of each row's valid history: fn(row, history) -> [V_padded]."""

    def __init__(self, fn):
        self.fn = fn

    def step(self, slots, cache, start, n):
        end = start + n
        out = []
        for r in range(slots.batch):
            hist = slots.tokens[r, :end][slots.valid[r, :end]].tolist()
            out.append(self.fn(r, hist) if slots.valid[r, end - 1] else torch.zeros(128))
        return torch.stack(out)


def _script_gen(script, context=64):
    """Row r prefers token script[r][k] at its k-th generated token (one-hot logits)."""

    def fn(r, hist):
        logits = torch.zeros(128)
        k = len(hist) - PLEN[r] if r < len(PLEN) else None
        if k is not None and 0 <= k < len(script[r]):
            logits[script[r][k]] = 10.0
        return logits

    return InterleavedGenerator(None, _Cfg(context), LAYOUT, stepper=ScriptedStepper(fn))


PLEN: list[int] = []


def _run_script(prompts, script, max_new, context=64):
    PLEN[:] = [len(p) for p in prompts]
    return _script_gen(script, context).generate(prompts, SamplingParams.greedy(), max_new)


# ------------------------------------------------------------------ sampling


def test_cfg_combination_equals_formula_on_known_logits():
    cond = torch.tensor([[1.0, 2.0, 3.0, -4.0]])
    uncond = torch.tensor([[0.5, 1.0, -1.0, 2.0]])
    expected = torch.tensor([[0.5 + 3.5 * 0.5, 1.0 + 3.5 * 1.0, -1.0 + 3.5 * 4.0, 2.0 + 3.5 * -6.0]])
    assert torch.equal(cfg_combine(cond, uncond, 3.5), expected)
    assert torch.equal(cfg_combine(cond, uncond, 1.0), cond)


def test_generator_samples_images_from_the_cfg_combination():
    """Cond prefers image code 1, uncond strongly prefers code 2: with alpha=4 the combination picks code 3."""
    c, u = torch.zeros(128), torch.zeros(128)
    c[IMG0 + 1], c[IMG0 + 3] = 5.0, 4.9
    u[IMG0 + 1], u[IMG0 + 2], u[IMG0 + 3] = 5.0, 6.0, 0.0
    assert int(cfg_combine(c, u, 4.0).argmax()) == IMG0 + 3
    gen = InterleavedGenerator(None, _Cfg(), LAYOUT, stepper=ScriptedStepper(lambda r, h: c if r == 0 else u))
    out = gen.generate([[1, 2, BRK]], SamplingParams.greedy(cfg_scale=4.0), TPI)[0]
    assert out.ids == [IMG0 + 3] * TPI
    gen = InterleavedGenerator(None, _Cfg(), LAYOUT, stepper=ScriptedStepper(lambda r, h: c))
    assert gen.generate([[1, 2, BRK]], SamplingParams.greedy(), TPI)[0].ids == [IMG0 + 1] * TPI


def test_top_p_keeps_the_nucleus_and_the_best_id():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    kept = torch.isfinite(top_p_filter(logits, 0.8))
    assert kept.tolist() == [[True, True, False, False]]
    assert torch.isfinite(top_p_filter(logits, 0.01)).tolist() == [[True, False, False, False]]


# ------------------------------------------------------------------ state machine


def test_eos_inside_text_stops_the_row():
    out = _run_script([[1, 2]], [[5, 6, EOS, 7, 8]], 10)[0]
    assert out.ids == [5, 6, EOS] and out.finish_reason == "eos"


def test_image_at_the_very_end_of_the_budget():
    script = [[5, BRK] + [IMG0 + k for k in range(TPI)] + [EOS]]
    out = _run_script([[1, 2]], script, 2 + TPI)[0]  # text, <break>, exactly one image: fits
    assert out.ids == [5, BRK] + [IMG0 + k for k in range(TPI)] and out.finish_reason == "length"
    out = _run_script([[1, 2]], script, 1 + TPI)[0]  # one token short: <break> is never sampled
    assert BRK not in out.ids and not LAYOUT.is_image(out.ids).any() and len(out.ids) == 1 + TPI
    # the context limits it the same way: 64 - 58 = 6 = 1 + TPI + 1 new tokens at most
    out = _run_script([[1] * 58], script, 100)[0]
    assert out.ids == [5, BRK] + [IMG0 + k for k in range(TPI)]


def test_batch_where_prompts_finish_at_different_times():
    prompts = [[1, 2, 3], [4], [7, 8, 9, 10, 11], [3, BRK]]
    script = [[5, EOS], [6, 6, 6, 6, 6, 6, 6, EOS], [BRK] + [IMG0 + 2] * TPI + [BRK, 9, EOS],
              [IMG0 + 5] * TPI + [EOS]]
    batch = _run_script(prompts, script, 12)
    for p, s, got in zip(prompts, script, batch):
        alone = _run_script([p], [s], 12)[0]
        assert got.ids == alone.ids == s and got.finish_reason == "eos"


def test_after_an_image_text_starts_with_a_text_token():
    script = [[BRK] + [IMG0] * TPI + [BRK, BRK, EOS, 7, EOS]]
    out = _run_script([[1]], script, 20)[0]
    # the 2nd <break> and the <eos> are refused right after an image's <break>: lowest text id 0 instead
    assert out.ids[: TPI + 3] == [BRK] + [IMG0] * TPI + [BRK, 0]


def _check_document(ids, starts_image, budget):
    """Every image: exactly TPI image ids after a <break>; no image id elsewhere; no other specials."""
    assert len(ids) <= budget
    state, n_img, after_break = ("image" if starts_image else "text"), 0, False
    for k, t in enumerate(ids):
        if state == "image":
            assert LAYOUT.is_image(t), ids
            n_img += 1
            state = "after" if n_img == TPI else "image"
        elif state == "after":
            assert t in (BRK, EOS), ids
            state, after_break = "text", t == BRK
        else:
            assert not (after_break and t in (BRK, EOS)), ids
            assert t in (BRK, EOS) or (LAYOUT.is_text(t) and t != EOS), ids
            state, n_img, after_break = ("image" if t == BRK else "text"), 0, False
        if t == EOS:
            assert k == len(ids) - 1, ids
    assert state != "image" or n_img == 0 and not ids, ids  # never an unfinished image


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 10_000), max_new=st.integers(1, 30),
       lens=st.lists(st.integers(1, 8), min_size=1, max_size=4),
       cfg=st.sampled_from([1.0, 3.0]), image_first=st.booleans())
def test_random_logits_always_give_well_formed_documents(seed, max_new, lens, cfg, image_first):
    g = torch.Generator().manual_seed(seed)
    bias = torch.zeros(128)
    bias[BRK], bias[EOS] = 3.0, -1.0  # breaks are frequent, so many images start

    def fn(r, hist):
        return torch.randn(128, generator=g) * 3 + bias

    prompts = [torch.randint(0, 40, (n,), generator=g).tolist() for n in lens]
    if image_first:
        prompts[0] = prompts[0] + [BRK]
        max_new = max(max_new, TPI)
    gen = InterleavedGenerator(None, _Cfg(), LAYOUT, stepper=ScriptedStepper(fn))
    outs = gen.generate(prompts, SamplingParams(cfg_scale=cfg, seed=seed), max_new)
    for p, out in zip(prompts, outs):
        _check_document(out.ids, p[-1] == BRK, min(max_new, 64 - len(p)))
        assert out.finish_reason in ("eos", "length")


def test_bad_prompts_are_refused_before_generation():
    gen = _script_gen([[5]])
    with pytest.raises(ValueError, match="context holds 64"):
        gen.generate([[1] * 64], SamplingParams.greedy(), 5)
    with pytest.raises(ValueError, match="outside the vocabulary"):
        gen.generate([[V + 3]], SamplingParams.greedy(), 5)
    with pytest.raises(ValueError, match="starts an image"):
        gen.generate([[1, BRK]], SamplingParams.greedy(), TPI - 1)
    with pytest.raises(ValueError, match=f"vocab_size={V - 1}"):  # a layout id without an embedding row
        InterleavedGenerator(None, _Cfg(vocab_size=V - 1), LAYOUT, stepper=ScriptedStepper(None))
    InterleavedGenerator(None, _Cfg(vocab_size=V + 10), LAYOUT, stepper=ScriptedStepper(None))  # spare rows: fine


# ------------------------------------------------------------------ real models


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    """Converted JAM-Cross (Llama + OPT; Chameleon + swin-norm Chameleon), JAM-Width and JAM-Uniform (Llama + Llama)
    tiny checkpoints."""
    import megatron_jam  # noqa: F401
    from megatron_jam.convert.checkpoint import ensure_single_rank
    from chameleon_helpers import make_chameleon
    from parent_helpers import convert, make_llama, make_opt

    ensure_single_rank()
    root = tmp_path_factory.mktemp("gen")
    LAYOUT.to_json(root / "layout.json")
    make_llama(root / "llm", seed=1, vocab=40, initializer_range=0.3)
    make_llama(root / "llm_b", seed=2, vocab=V, initializer_range=0.3)
    make_opt(root / "img", seed=3, vocab=V, init_std=0.3)
    lay = str(root / "layout.json")
    convert("cross", root / "cross0", root / "llm", root / "img", cross_every=1, vocab_layout=lay, seq_length=64)
    _with_live_cross_blocks(root / "cross0", root / "cross")
    convert("width", root / "width", root / "llm", root / "llm_b", vocab_layout=lay, seq_length=64)
    convert("uniform", root / "uniform", root / "llm", root / "llm_b", vocab_layout=lay, seq_length=64)
    # Chameleon bodies: per-head q/k norms in both streams, the swin placement in the image stream
    make_chameleon(root / "cham", seed=4, vocab_size=40, initializer_range=0.3)
    make_chameleon(root / "cham_swin", seed=5, vocab_size=V, initializer_range=0.3, swin_norm=True)
    convert("cross", root / "cham0", root / "cham", root / "cham_swin", cross_every=1, vocab_layout=lay,
            seq_length=64)
    _with_live_cross_blocks(root / "cham0", root / "cross_chameleon")
    return {m: str(root / m) for m in ("cross", "width", "uniform", "cross_chameleon")}


def _with_live_cross_blocks(src, dst):
    """The converter zeroes the cross blocks' output projections (step 0 = parents), which would hide
    any error in the cross-attention cache; give them random weights and save again."""
    import shutil

    from megatron.core import dist_checkpointing

    from megatron_jam.convert.checkpoint import build_single, load_checkpoint
    from megatron_jam.models.kinds import load_model_config

    cfg = load_model_config(str(src))
    model = build_single(cfg, initialize=False)
    load_checkpoint([model], str(src))
    g = torch.Generator().manual_seed(11)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "_cross." in name and ("linear_proj" in name or "linear_fc2" in name):
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    dst.mkdir()
    dist_checkpointing.save(model.sharded_state_dict(), str(dst))
    shutil.copy(src / "model_config.json", dst / "model_config.json")


PROMPTS = [[1, 2, 3, 4, 5, 6], [7, 8], [9, 10, 11, BRK], [12, 13, 14, 15]]


def _generate(path, tp=1, use_cache=True, stepper_cls=None, cfg_scale=3.0, prompts=PROMPTS, max_new=20,
              decode_step="eager"):
    from megatron_jam.inference.loading import load_model

    model, cfg = load_model(path, tp)
    stepper = stepper_cls(model) if stepper_cls else None
    gen = InterleavedGenerator(model, cfg, LAYOUT, use_cache=use_cache, stepper=stepper, decode_step=decode_step)
    return [(o.ids, o.finish_reason) for o in gen.generate(prompts, SamplingParams.greedy(cfg_scale), max_new)]


@pytest.mark.parametrize("method", ["cross", "width", "uniform", "cross_chameleon"])
def test_greedy_with_cache_equals_without(single_rank, ckpts, method):
    cached = _generate(ckpts[method])
    assert cached == _generate(ckpts[method], stepper_cls=FullForwardStepper)  # the model's own forward
    assert cached == _generate(ckpts[method], use_cache=False)  # our batched recompute (benchmark baseline)
    assert cached == _generate(ckpts[method], decode_step="static")  # fixed shapes (what CUDA graphs replay)
    ids = [t for out, _ in cached for t in out]
    assert len(set(ids)) > 5, "degenerate test model: decoding repeats one token"
    assert sum(LAYOUT.is_image(ids)) >= TPI  # at least one image (prompt 3 starts one)


def _trace_steps(monkeypatch, cls, attr, persistent):
    """Record the operators of every call of `cls.attr` (a decode step's forward)."""
    from megatron_jam.testing.op_trace import OpTrace, storage_key

    traces, original = [], getattr(cls, attr)

    def traced(self, *args):
        with OpTrace({storage_key(t) for t in persistent(self)}) as trace:
            out = original(self, *args)
        traces.append(trace)
        return out

    monkeypatch.setattr(cls, attr, traced)
    return traces


@pytest.mark.parametrize("method", ["cross", "cross_chameleon", "width"])
def test_static_decode_step_is_the_same_work_every_step(single_rank, ckpts, monkeypatch, method):
    """What a CUDA graph replays, checked without a GPU: every fixed-shape step (`--decode-step static`,
    the body of `cuda-graph`) dispatches the same operators with the same shapes and scalars, and reads
    the same weights, cache and input buffers; finished rows and CFG rows only change buffer contents.
    The eager step is the control: its shapes grow every step."""
    from megatron_jam.inference.static_decode import StaticDecoder
    from megatron_jam.inference.stepper import _Stepper
    from megatron_jam.testing.op_trace import first_difference

    with monkeypatch.context() as m:
        static = _trace_steps(m, StaticDecoder, "_forward", StaticDecoder.persistent_tensors)
        _generate(ckpts[method], decode_step="static", max_new=12)
    assert len(static) == 11 and len(static[0].ops) > 50  # 12 tokens: the prefill step, then 11 static steps
    assert static[0].foreign == static[0].host_reads == 0  # no host data in, no value back out (no sync)
    for trace in static[1:]:
        assert trace.ops == static[0].ops, first_difference(static[0].ops, trace.ops)
    with monkeypatch.context() as m:
        eager = _trace_steps(m, _Stepper, "forward", lambda self: [])
        _generate(ckpts[method], max_new=4)
    assert eager[1].ops != eager[2].ops


def _tp2_generate(path, decode_step="eager"):
    from megatron_jam.parallel.initialize import initialize_model_parallel

    initialize_model_parallel(tp=2, seed=5)
    return _generate(path, tp=2, decode_step=decode_step)


def test_tp2_greedy_equals_tp1(single_rank, pool2, ckpts):
    for method, decode_step in (("cross", "eager"), ("width", "eager"), ("cross", "static")):
        ref = _generate(ckpts[method])
        for got in pool2.run(_tp2_generate, ckpts[method], decode_step):
            assert got == ref, (method, decode_step)


def test_decode_step_refusals(single_rank, ckpts):
    from megatron_jam.inference.loading import load_model

    model, cfg = load_model(ckpts["width"], 1)
    with pytest.raises(ValueError, match="cuda-graph needs the model on a CUDA device"):
        InterleavedGenerator(model, cfg, LAYOUT, decode_step="cuda-graph")
    with pytest.raises(ValueError, match="drop --no-kv-cache"):
        InterleavedGenerator(model, cfg, LAYOUT, decode_step="static", use_cache=False)
    with pytest.raises(ValueError, match="expected one of eager, static, cuda-graph"):
        InterleavedGenerator(model, cfg, LAYOUT, decode_step="graph")
