"""Analytic parameter counts of the parents and of JAM-Cross (paper Table 4).

Why analytic: Table 4's sizes are for 7B parents (d=4096, 32 layers), far too
large to build in a test; the same formulas are checked against the real
modules on tiny configs, so the 7B figures are the model's, not a guess.
"""

from megatron_jam.models.config import JamCrossConfig, ParentConfig


def _norm(p: ParentConfig) -> int:
    if not p.learnable_norm:
        return 0
    return p.hidden_size * (1 if p.family == "llama" else 2)  # RMSNorm: scale; LayerNorm: scale+shift


def _linear(n_in: int, n_out: int, bias: bool) -> int:
    return n_in * n_out + (n_out if bias else 0)


def parent_layer_params(p: ParentConfig) -> int:
    d, b, a = p.hidden_size, p.add_bias_linear, p.attention_width
    kv = 2 * p.query_groups * p.head_dim
    attn = _linear(d, a + kv, b) + _linear(a, d, b)
    fc1_out = 2 * p.ffn_size if p.gated else p.ffn_size
    mlp = _linear(d, fc1_out, b) + _linear(p.ffn_size, d, b)
    qk = 2 * (p.num_attention_heads + p.query_groups) * p.head_dim if p.qk_layernorm else 0
    return attn + mlp + 2 * _norm(p) + qk  # Chameleon's per-head q/k norms: weight and bias per head


def cross_block_params(cfg: JamCrossConfig, p: ParentConfig) -> int:
    """One direction's block: Q, KV, output projection, non-gated MLP, two norms (~12 d^2)."""
    d, b, a = p.hidden_size, p.add_bias_linear, p.attention_width
    attn = _linear(d, a, b) + _linear(d, 2 * a, b) + _linear(a, d, b)  # MHA: keys/values as wide as queries
    mlp = _linear(d, cfg.cross_ffn_size, b) + _linear(cfg.cross_ffn_size, d, b)
    return attn + mlp + 2 * _norm(p)


def parent_params(p: ParentConfig, vocab_size: int, tied: bool = True) -> int:
    """A standalone parent GPT (embedding, positions, layers, final norm, output if untied)."""
    emb = vocab_size * p.hidden_size * (1 if tied else 2)
    pos = p.max_position_embeddings * p.hidden_size if p.family == "opt" else 0
    return emb + pos + p.num_layers * parent_layer_params(p) + _norm(p)


def jam_cross_params(cfg: JamCrossConfig, with_cross: bool = True, padded_vocab: bool = True) -> int:
    """JAM-Cross: shared embedding, both streams, cross blocks (if `with_cross`), fusion linear."""
    vocab = cfg.padded_vocab_size if padded_vocab else cfg.vocab_size
    d = cfg.hidden_size
    total = vocab * d * (1 if cfg.share_embeddings_and_output_weights else 2)
    for p in (cfg.llm, cfg.img):
        total += p.max_position_embeddings * d if p.family == "opt" else 0
        total += p.num_layers * parent_layer_params(p) + _norm(p)
        if with_cross:
            total += cfg.num_cross_pairs * cross_block_params(cfg, p)
    return total + 2 * d * d  # fusion linear [d, 2d]


def table4_rows(vocab_size: int = 65536) -> dict[str, float]:
    """Paper Table 4 for 7B CM3leon-style parents (d=4096, 32 layers, 32 heads, no biases,
    no learnable norms, 4096 positions): size in billions per cross-attention setting."""
    p = ParentConfig(family="opt", num_layers=32, hidden_size=4096, num_attention_heads=32,
                     max_position_embeddings=4096, add_bias_linear=False, learnable_norm=False)
    rows = {"none": jam_cross_params(JamCrossConfig(llm=p, img=p, vocab_size=vocab_size), with_cross=False)}
    for k in (1, 2, 4):
        rows[f"k={k}"] = jam_cross_params(JamCrossConfig(llm=p, img=p, vocab_size=vocab_size, cross_every=k))
    return {k: v / 1e9 for k, v in rows.items()}


def model_params(cfg) -> int:
    """Parameters of any registered model kind (`models.kinds`)."""
    from megatron_jam.models.kinds import kind_of

    return kind_of(cfg).params(cfg)
