"""Training FLOPs per token of a parent GPT and of JAM-Cross (matmuls and attention).

Why: throughput targets compare a fused step with its parents' steps "plus the
cross blocks' FLOP share", and the trainer reports model TFLOP/s. Convention
(Megatron-LM / PaLM): 6 FLOPs per matmul parameter per token for forward and
backward, plus 12 * s * d per attention layer per token for the score and
value products (full s x s matrix, as the unfused kernels compute it). Norms,
activations and embedding lookups are ignored.
"""

from megatron_jam.models.config import JamCrossConfig, ParentConfig
from megatron_jam.models.param_count import cross_block_params, parent_layer_params


def _matmul_params_layer(p: ParentConfig) -> int:
    norms = 2 * (p.hidden_size * (1 if p.family == "llama" else 2) if p.learnable_norm else 0)
    return parent_layer_params(p) - norms


def parent_flops_per_token(p: ParentConfig, vocab_size: int, seq_length: int) -> float:
    d = p.hidden_size
    return (6.0 * (p.num_layers * _matmul_params_layer(p) + vocab_size * d)
            + 12.0 * p.num_layers * seq_length * p.attention_width)


def cross_blocks_flops_per_token(cfg: JamCrossConfig, seq_length: int) -> float:
    total = 0.0
    for p in (cfg.llm, cfg.img):
        norms = 2 * (p.hidden_size * (1 if p.family == "llama" else 2) if p.learnable_norm else 0)
        per_block = 6.0 * (cross_block_params(cfg, p) - norms) + 12.0 * seq_length * p.attention_width
        total += cfg.num_cross_pairs * per_block
    return total


def jam_cross_flops_per_token(cfg: JamCrossConfig, seq_length: int) -> float:
    """Both streams, the cross blocks, the fusion linear and one (shared) output layer."""
    v, d = cfg.padded_vocab_size, cfg.hidden_size
    streams = sum(parent_flops_per_token(p, v, seq_length) - 6.0 * v * d for p in (cfg.llm, cfg.img))
    return streams + cross_blocks_flops_per_token(cfg, seq_length) + 6.0 * (2 * d * d + v * d)


def model_flops_per_token(cfg, seq_length: int) -> float:
    """Training FLOPs per token of any registered model kind (the MFU numerator)."""
    from megatron_jam.models.kinds import kind_of

    return kind_of(cfg).flops_per_token(cfg, seq_length)
