"""Model configs: one parent decoder (`ParentConfig`) and the JAM-Cross fusion (`JamCrossConfig`).

Why our own dataclasses instead of raw `TransformerConfig`: a JAM model has
two parents of possibly different families (CM3leon/OPT-style and
Llama-style), each with its own shape, and a fusion that adds new blocks.
These configs are what the converter writes next to a checkpoint and what
the trainer, evaluator and generator read, so nobody retypes architecture
flags. `to_transformer_config` turns them into Megatron-Core configs at the
parallel layout of the run; `validate_parallel` checks the layout *before*
any process group starts, with errors that name the values.
"""

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Literal

FAMILIES = ("opt", "llama")


class ConfigError(ValueError):
    """An invalid model or parallel configuration; the message names the values."""


@dataclass(frozen=True, kw_only=True)
class ParentConfig:
    """One pretrained decoder-only parent (the LLM or the image-text model)."""

    family: Literal["opt", "llama"] = "opt"
    """'opt': CM3leon/OPT style (learned absolute positions, LayerNorm, GELU MLP).
    'llama': RoPE, RMSNorm, SwiGLU, grouped-query attention."""
    num_layers: int = 4
    """Number of transformer layers."""
    hidden_size: int = 64
    """Model width d."""
    num_attention_heads: int = 4
    """Query heads."""
    num_query_groups: int | None = None
    """Key/value heads for grouped-query attention (None: equal to the query heads)."""
    ffn_hidden_size: int | None = None
    """MLP width (None: 4 * hidden_size for 'opt', Llama's 8/3 rule rounded to 64 for 'llama')."""
    max_position_embeddings: int = 4096
    """Rows of the learned position table ('opt'); the RoPE context for 'llama'."""
    add_bias_linear: bool = True
    """Biases in linear layers (CM3leon: False)."""
    learnable_norm: bool = True
    """Learnable norm scale/shift (CM3leon: False)."""
    norm_epsilon: float = 1e-5
    """Epsilon of the LayerNorm / RMSNorm."""
    rotary_base: int = 10000
    """RoPE base ('llama' only)."""
    activation: Literal["gelu", "relu", "swiglu", "geglu"] | None = None
    """MLP activation (None: 'gelu' for 'opt', 'swiglu' for 'llama'; OPT checkpoints use 'relu'; Gemma's
    'geglu' is a gated MLP with the tanh approximation of GELU)."""
    hidden_dropout: float = 0.0
    """Dropout after attention and MLP (CM3leon trains with none)."""
    attention_dropout: float = 0.0
    """Dropout on attention probabilities."""
    qk_layernorm: bool = False
    """Chameleon: queries and keys LayerNorm-ed per head over head_dim (weight and bias per head), before RoPE."""
    swin_norm: bool = False
    """Chameleon-30B's norm placement: `x + norm(attn(x))`, `h + norm(mlp(h))`, no pre-norms."""
    norm_zero_centered: bool = False
    """Gemma: the RMSNorm scales by `1 + weight` (weights stored zero-centred; Megatron's
    `layernorm_zero_centered_gamma`)."""
    kv_channels: int | None = None
    """Width of one attention head (None: hidden_size / num_attention_heads; Gemma-7B: 256 at d 3072 with
    16 heads, so the attention is 4096 wide)."""
    embedding_multiplier: float = 1.0
    """Word embeddings are multiplied by this before the first layer (Gemma: sqrt(hidden_size), rounded to
    the weights' dtype as transformers does)."""

    @property
    def act(self) -> str:
        return self.activation or ("swiglu" if self.family == "llama" else "gelu")

    @property
    def ffn_size(self) -> int:
        if self.ffn_hidden_size is not None:
            return self.ffn_hidden_size
        if self.family == "llama":
            return 64 * ((int(8 * self.hidden_size / 3) + 63) // 64)
        return 4 * self.hidden_size

    @property
    def query_groups(self) -> int:
        return self.num_query_groups or self.num_attention_heads

    @property
    def gated(self) -> bool:
        """A gated MLP (SwiGLU, GeGLU): fc1 holds the gate and the up projection."""
        return self.act in ("swiglu", "geglu")

    @property
    def attention_width(self) -> int:
        """Query heads x head width (= hidden_size unless `kv_channels` says otherwise)."""
        return self.num_attention_heads * self.head_dim

    @property
    def head_dim(self) -> int:
        return self.kv_channels or self.hidden_size // self.num_attention_heads

    def __post_init__(self):
        if (self.qk_layernorm or self.swin_norm) and self.family != "llama":
            raise ConfigError("qk_layernorm / swin_norm (the Chameleon body) need family='llama'")
        if self.embedding_multiplier != 1.0 and self.family != "llama":
            raise ConfigError("embedding_multiplier (Gemma's sqrt(d)) needs family='llama' (with learned positions "
                              "the word and position embeddings would be scaled differently by the two model kinds)")
        if self.norm_zero_centered and (self.family != "llama" or not self.learnable_norm):
            raise ConfigError("norm_zero_centered (Gemma's RMSNorm) needs family='llama' and learnable_norm=True")
        if self.family not in FAMILIES:
            raise ConfigError(f"family={self.family!r} is not one of {FAMILIES}")
        if self.kv_channels is None and self.hidden_size % self.num_attention_heads:
            raise ConfigError(
                f"hidden_size={self.hidden_size} is not divisible by num_attention_heads={self.num_attention_heads}"
            )
        if self.num_attention_heads % self.query_groups:
            raise ConfigError(
                f"num_attention_heads={self.num_attention_heads} is not divisible by "
                f"num_query_groups={self.query_groups}"
            )


class ModelConfigMixin:
    """What every model config shares: the padded vocabulary and JSON (`model_config.json`).

    Subclasses set `MODEL_TYPE` and `PARENT_FIELDS` (fields holding a `ParentConfig`).
    """

    MODEL_TYPE = ""
    PARENT_FIELDS: tuple[str, ...] = ()

    @property
    def padded_vocab_size(self) -> int:
        m = self.make_vocab_size_divisible_by
        return ((self.vocab_size + m - 1) // m) * m

    def to_dict(self) -> dict:
        return dataclasses.asdict(self) | {"model_type": self.MODEL_TYPE}

    def to_json(self, path: str) -> None:
        with open(path, "w") as f:
            json.dump(self.to_dict(), f, indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, d: dict):
        d = {k: v for k, v in d.items() if k != "model_type"}
        unknown = sorted(set(d) - {f.name for f in dataclasses.fields(cls)})
        if unknown:
            raise ConfigError(f"unknown {cls.__name__} fields: {unknown}")
        return cls(**{**d, **{k: ParentConfig(**d[k]) for k in cls.PARENT_FIELDS if k in d}})

    @classmethod
    def from_json(cls, path: str):
        with open(path) as f:
            return cls.from_dict(json.load(f))


@dataclass(frozen=True, kw_only=True)
class JamCrossConfig(ModelConfigMixin):
    """JAM-Cross (paper section 2.1.3): two parent streams, bidirectional cross blocks every k layers."""

    llm: ParentConfig = field(default_factory=ParentConfig)
    """The text LLM parent."""
    img: ParentConfig = field(default_factory=ParentConfig)
    """The image-text (CM3leon-style) parent."""
    vocab_size: int = 512
    """Fused vocabulary: text tokens, special tokens, image codes (unpadded)."""
    make_vocab_size_divisible_by: int = 128
    """The embedding is padded to a multiple of this (independent of TP, so checkpoints reshard)."""
    cross_every: int = 2
    """k: a pair of cross blocks enters every k-th parent layer (paper Table 4: 1, 2, 4)."""
    cross_ffn_hidden_size: int | None = None
    """MLP width of a cross block (None: 4 * hidden_size, i.e. ~12 d^2 parameters per block)."""
    cross_zero_init: bool = True
    """Zero the cross blocks' output projections so each stream equals its parent at step 0."""
    share_embeddings_and_output_weights: bool = True
    """One shared input/output embedding (the paper's choice)."""
    seq_length: int = 128
    """Training sequence length."""

    MODEL_TYPE = "jam_cross"
    PARENT_FIELDS = ("llm", "img")

    @property
    def hidden_size(self) -> int:
        return self.llm.hidden_size

    @property
    def num_layers(self) -> int:
        return self.llm.num_layers

    @property
    def cross_ffn_size(self) -> int:
        return self.cross_ffn_hidden_size or 4 * self.hidden_size

    @property
    def num_cross_pairs(self) -> int:
        return self.num_layers // self.cross_every

    def cross_layer_indices(self) -> list[int]:
        """0-based parent layers whose *input* hidden states feed a cross-block pair.

        Layers k-1, 2k-1, ..., L-1 (as open_flamingo's `(i + 1) % k == 0`): the
        first pair sees the outputs of k-1 parent layers (the embeddings when k=1).
        """
        k = self.cross_every
        return [i for i in range(self.num_layers) if (i + 1) % k == 0]

    def __post_init__(self):
        validate_fusion(self)


def validate_fusion(cfg: JamCrossConfig) -> None:
    """Parent shapes that JAM-Cross cannot fuse, each a ConfigError naming both values."""
    a, b = cfg.llm, cfg.img
    if a.hidden_size != b.hidden_size:
        raise ConfigError(
            f"JAM-Cross needs parents of equal width: llm.hidden_size={a.hidden_size}, "
            f"img.hidden_size={b.hidden_size} (different widths need a context projection, not supported)"
        )
    if a.num_layers != b.num_layers:
        raise ConfigError(
            f"JAM-Cross pairs layer l of both parents: llm.num_layers={a.num_layers}, img.num_layers={b.num_layers}"
        )
    k = cfg.cross_every
    if k < 1 or a.num_layers % k:
        raise ConfigError(f"cross_every={k} must be >= 1 and divide num_layers={a.num_layers}")
    if cfg.vocab_size < 1:
        raise ConfigError(f"vocab_size={cfg.vocab_size} must be positive")


def validate_stack(cfg, parents: dict[str, ParentConfig], tp: int = 1, pp: int = 1, vpp: int | None = None,
                   sequence_parallel: bool = False, seq_length: int | None = None) -> int:
    """Layout checks every model shares (TP divisibility of each stack and the vocabulary,
    pipeline stages, sequence parallelism); returns the layers per pipeline stage."""
    for name, p in parents.items():
        prefix = f"{name}." if name else ""
        _check_div(f"{prefix}num_attention_heads", p.num_attention_heads, "tensor-model-parallel-size", tp)
        _check_div(f"{prefix}num_query_groups", p.query_groups, "tensor-model-parallel-size", tp)
        _check_div(f"{prefix}ffn_hidden_size", p.ffn_size, "tensor-model-parallel-size", tp)
    _check_div("padded vocab size", cfg.padded_vocab_size, "tensor-model-parallel-size", tp)
    stages = pp * (vpp or 1)
    if cfg.num_layers % stages:
        raise ConfigError(
            f"num_layers={cfg.num_layers} is not divisible by the pipeline stages "
            f"(pipeline-model-parallel-size={pp} x virtual stages={vpp or 1} = {stages})"
        )
    if sequence_parallel and tp == 1:
        raise ConfigError("--sequence-parallel needs tensor-model-parallel-size > 1")
    if sequence_parallel and seq_length is not None and seq_length % tp:
        raise ConfigError(f"seq_length={seq_length} is not divisible by tensor-model-parallel-size={tp}")
    return cfg.num_layers // stages


def validate_parallel(cfg: JamCrossConfig, tp: int = 1, pp: int = 1, vpp: int | None = None,
                      sequence_parallel: bool = False, seq_length: int | None = None) -> None:
    """Check a JAM-Cross layout before process groups start; raise ConfigError naming the values."""
    per_stage = validate_stack(cfg, {"llm": cfg.llm, "img": cfg.img}, tp, pp, vpp, sequence_parallel, seq_length)
    _check_div("cross_ffn_hidden_size", cfg.cross_ffn_size, "tensor-model-parallel-size", tp)
    if per_stage % cfg.cross_every:
        raise ConfigError(
            f"each pipeline stage holds {per_stage} layers (num_layers={cfg.num_layers} / "
            f"{cfg.num_layers // per_stage} stages), not a multiple of cross_every={cfg.cross_every}: "
            f"cross blocks would straddle stages"
        )


def _check_div(what: str, value: int, by_name: str, by: int) -> None:
    if by < 1 or value % by:
        raise ConfigError(f"{what}={value} is not divisible by {by_name}={by}")


@dataclass(frozen=True, kw_only=True)
class JamGPTConfig(ModelConfigMixin):
    """One decoder stack: an imported parent, JAM-Uniform, or JAM-Width."""

    parent: ParentConfig = field(default_factory=ParentConfig)
    """Shape of the stack (JAM-Width: hidden, heads, groups and MLP width doubled)."""
    vocab_size: int = 512
    """Vocabulary rows used by data (unpadded)."""
    make_vocab_size_divisible_by: int = 128
    """The embedding is padded to a multiple of this (independent of TP, so checkpoints reshard)."""
    share_embeddings_and_output_weights: bool = True
    """Tied input/output embedding (OPT, CM3leon: True; most Llamas: False)."""
    seq_length: int = 2048
    """Training sequence length."""

    MODEL_TYPE = "gpt"
    PARENT_FIELDS = ("parent",)

    @property
    def hidden_size(self) -> int:
        return self.parent.hidden_size

    @property
    def num_layers(self) -> int:
        return self.parent.num_layers

    def __post_init__(self):
        if self.vocab_size < 1:
            raise ConfigError(f"vocab_size={self.vocab_size} must be positive")


def validate_gpt_parallel(cfg: JamGPTConfig, tp: int = 1, pp: int = 1, vpp: int | None = None,
                          sequence_parallel: bool = False, seq_length: int | None = None) -> None:
    """Check a parallel layout before process groups start; raise ConfigError naming the values."""
    validate_stack(cfg, {"": cfg.parent}, tp, pp, vpp, sequence_parallel, seq_length)
