"""JAM-Cross (paper section 2.1.3, Figure 2): two parent stacks joined by bidirectional cross blocks.

How it differs from a GPT: the token sequence runs through *two* parent
decoders side by side (the LLM stream and the image-text stream). Before
every k-th parent layer l (layers k-1, 2k-1, ..., 0-based) a pair of new
cross blocks lets each stream's queries attend to the other stream's hidden
states entering layer l (eq. 4), causally, since both streams read the same
tokens. One embedding is shared by both streams' inputs and by the output
(text rows from the LLM, image rows from the image model); each stream keeps
its own positions (learned table or RoPE). At the top, the two final
hidden states are concatenated (2d) and a new linear maps them to d before
the shared output embedding.

Parallelism comes from Megatron-Core: the streams and cross blocks are
`TransformerBlock`s of Megatron `TransformerLayer`s (column/row-parallel
linears, heads split across TP); pipeline stages hold layer l of both
streams together and exchange one tensor that packs both streams along the
*batch* dimension, `[s(/tp), 2b, h]`, which stays correct under sequence
parallelism (the sequence dimension is what SP scatters).

At step 0 (`cross_zero_init`), the cross blocks' output projections are zero,
so each stream computes exactly what its parent computes.
"""

import torch
from torch import Tensor
from megatron.core import parallel_state, tensor_parallel
from megatron.core.enums import ModelType
from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding
from megatron.core.models.common.language_module.language_module import LanguageModule
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_block import TransformerBlock, get_num_layers_to_build
from megatron.core.transformer.transformer_config import TransformerConfig

from megatron_jam.models.builders import cross_transformer_config, embedding_scale, parent_transformer_config
from megatron_jam.models.config import JamCrossConfig, ParentConfig, validate_parallel
from megatron_jam.models.jam_cross_loop import CrossLayerLoop
from megatron_jam.models.specs import block_spec, cross_layer_spec, parent_layer_spec

STREAMS = ("llm", "img")


class JamEmbedding(MegatronModule):
    """The shared word embedding plus each stream's own learned positions (if it has them)."""

    def __init__(self, config: TransformerConfig, vocab_size: int, parents: dict[str, ParentConfig]):
        super().__init__(config=config)
        self.word_embeddings = tensor_parallel.VocabParallelEmbedding(
            num_embeddings=vocab_size, embedding_dim=config.hidden_size,
            init_method=config.embedding_init_method, config=config)
        for name, p in parents.items():
            if p.family == "opt":
                table = torch.nn.Embedding(p.max_position_embeddings, config.hidden_size, dtype=config.params_dtype)
                if config.perform_initialization:
                    config.embedding_init_method(table.weight)
                setattr(self, f"{name}_position_embeddings", table)
        self.scales = {name: embedding_scale(p, config) for name, p in parents.items()}
        """Per-stream multiplier of the shared word embedding (Gemma parents: sqrt(d)); None = 1."""
        self.dropout = torch.nn.Dropout(config.hidden_dropout)

    def forward(self, input_ids: Tensor, position_ids: Tensor) -> tuple[Tensor, Tensor]:
        words = self.word_embeddings(input_ids)  # [b, s, h]
        out = []
        for name in STREAMS:
            table = getattr(self, f"{name}_position_embeddings", None)
            h = words if self.scales[name] is None else words * self.scales[name]
            h = h if table is None else h + table(position_ids)
            h = h.transpose(0, 1).contiguous()  # [b, s, h] -> [s, b, h]
            if self.config.sequence_parallel:
                # -> [s/tp, b, h]; a view of the full tensor: clone it so that one can be freed (Megatron's embedding)
                h = tensor_parallel.scatter_to_sequence_parallel_region(h).clone()
                with tensor_parallel.get_cuda_rng_tracker().fork():
                    h = self.dropout(h)
            else:
                h = self.dropout(h)
            out.append(h)
        return out[0], out[1]


class FusionLinear(MegatronModule):
    """The new linear from concat(h_llm, h_img) (2d) to d, replicated on every TP rank.

    Initialised to the average of the two streams, [I/2, I/2]. Under sequence
    parallelism each rank sees a sequence slice, so its gradient is marked
    `sequence_parallel` and all-reduced by Megatron's `finalize_model_grads`.
    """

    def __init__(self, config: TransformerConfig):
        super().__init__(config=config)
        d = config.hidden_size
        eye = torch.eye(d, dtype=config.params_dtype)
        self.weight = torch.nn.Parameter(torch.cat([eye, eye], dim=1) * 0.5)  # [d, 2d]
        self.weight.sequence_parallel = config.sequence_parallel

    def forward(self, h_llm: Tensor, h_img: Tensor) -> Tensor:
        return torch.nn.functional.linear(torch.cat([h_llm, h_img], dim=-1), self.weight)


@torch.no_grad()
def zero_cross_layer_outputs(layer) -> None:
    """Zero one cross block's attention output and MLP output projections (weights and biases): the
    block then adds nothing to its stream, which computes exactly its parent (`cross_zero_init`)."""
    for lin in (layer.cross_attention.linear_proj, layer.mlp.linear_fc2):
        lin.weight.zero_()
        if getattr(lin, "bias", None) is not None:
            lin.bias.zero_()


class JamCrossModel(LanguageModule):
    """The JAM-Cross model: the stage of it this rank holds (pre_process: first, post_process: last).

    `p2p_batch_multiplier = 2`: pipeline stages exchange both streams packed on
    the batch dimension, so the schedule's tensor shape uses 2 * micro_batch_size.
    """

    p2p_batch_multiplier = 2

    def __init__(self, cfg: JamCrossConfig, pre_process: bool = True, post_process: bool = True,
                 parallel_output: bool = True, use_te: bool = False, vp_stage: int | None = None,
                 **parallel):
        validate_parallel(cfg, parallel.get("tensor_model_parallel_size", 1),
                          parallel.get("pipeline_model_parallel_size", 1),
                          parallel.get("virtual_pipeline_model_parallel_size"),
                          parallel.get("sequence_parallel", False))
        configs = {name: parent_transformer_config(getattr(cfg, name), **parallel) for name in STREAMS}
        super().__init__(config=configs["llm"])
        self.cfg = cfg
        self.pre_process, self.post_process = pre_process, post_process
        self.parallel_output = parallel_output
        self.vp_stage = vp_stage
        self.share_embeddings_and_output_weights = cfg.share_embeddings_and_output_weights
        self.model_type = ModelType.encoder_or_decoder

        if pre_process:
            self.embedding = JamEmbedding(self.config, cfg.padded_vocab_size, {n: getattr(cfg, n) for n in STREAMS})
        for name in STREAMS:
            self._build_stream(name, configs[name], cfg, use_te, parallel)
        self.layer_loop = CrossLayerLoop(self)
        if post_process:
            self.fusion = FusionLinear(self.config)
            self.output_layer = tensor_parallel.ColumnParallelLinear(
                self.config.hidden_size, cfg.padded_vocab_size, config=self.config,
                init_method=self.config.init_method, bias=False, skip_bias_add=False,
                gather_output=not parallel_output,
                skip_weight_param_allocation=pre_process and self.share_embeddings_and_output_weights)
        if cfg.cross_zero_init:
            self.zero_cross_outputs()
        if pre_process or post_process:
            self.setup_embeddings_and_output_layer()

    def _build_stream(self, name: str, config: TransformerConfig, cfg: JamCrossConfig, use_te: bool,
                      parallel: dict) -> None:
        p: ParentConfig = getattr(cfg, name)
        pp_rank = parallel_state.get_pipeline_model_parallel_rank()
        n_local = get_num_layers_to_build(config, self.vp_stage, pp_rank)
        stack = TransformerBlock(config, block_spec(parent_layer_spec(p, use_te), n_local,
                                                    p.learnable_norm),
                                 pre_process=self.pre_process, post_process=self.post_process,
                                 vp_stage=self.vp_stage)
        setattr(self, name, stack)
        xcfg = cross_transformer_config(cfg, p, **parallel)
        n_cross = get_num_layers_to_build(xcfg, self.vp_stage, pp_rank)
        # The queries of `<name>_cross` come from stream `name`, its keys/values from the other.
        setattr(self, f"{name}_cross", TransformerBlock(
            xcfg, block_spec(cross_layer_spec(p.learnable_norm, use_te), n_cross, p.learnable_norm),
            pre_process=self.pre_process, post_process=False, vp_stage=self.vp_stage))
        if p.family == "llama":
            setattr(self, f"{name}_rotary", RotaryEmbedding(
                kv_channels=config.kv_channels, rotary_percent=1.0, rotary_base=p.rotary_base,
                use_cpu_initialization=config.use_cpu_initialization))

    def zero_cross_outputs(self) -> None:
        """Zero the cross blocks' attention output and MLP output projections (weights and biases)."""
        for stack in (self.llm_cross, self.img_cross):
            for layer in stack.layers:
                zero_cross_layer_outputs(layer)

    def set_input_tensor(self, input_tensor) -> None:
        """Pipeline input: both streams packed on the batch dim, `[s(/tp), 2b, h]`."""
        if isinstance(input_tensor, (list, tuple)):
            assert len(input_tensor) == 1, "JamCrossModel takes one packed pipeline tensor"
            input_tensor = input_tensor[0]
        self.input_tensor = input_tensor

    def _rotary(self, name: str, hidden: Tensor):
        rope = getattr(self, f"{name}_rotary", None)
        if rope is None:
            return None
        seq = hidden.size(0) * (self.config.tensor_model_parallel_size if self.config.sequence_parallel else 1)
        return rope(seq)

    def forward_streams(self, input_ids: Tensor | None, position_ids: Tensor | None) -> tuple[Tensor, Tensor]:
        """Run this stage's layers; returns (h_llm, h_img), each `[s(/tp), b, h]`.

        On the last stage they are the streams' final-norm outputs, elsewhere the
        hidden states to send to the next stage.
        """
        if self.pre_process:
            h_llm, h_img = self.embedding(input_ids, position_ids)
        else:
            b = self.input_tensor.size(1) // 2  # [s, 2b, h] -> 2 x [s, b, h]
            h_llm, h_img = self.input_tensor[:, :b], self.input_tensor[:, b:]
        rope = {"llm": self._rotary("llm", h_llm), "img": self._rotary("img", h_img)}
        h_llm, h_img = self.layer_loop.run(
            h_llm, h_img,
            parent=lambda name, i, layer, h: layer(h, attention_mask=None, rotary_pos_emb=rope[name])[0],
            cross=lambda name, j, block, h, context: block(h, attention_mask=None, context=context)[0],
            recompute=self.training)
        if self.post_process:
            h_llm, h_img = self.llm.final_layernorm(h_llm), self.img.final_layernorm(h_img)
        return h_llm, h_img

    def forward(self, input_ids: Tensor, position_ids: Tensor, attention_mask: Tensor | None = None,
                labels: Tensor | None = None) -> Tensor:
        """Causal attention masks are implicit (`attention_mask` must be None).

        Returns: non-last stage, the packed `[s(/tp), 2b, h]` pipeline tensor; last
        stage, per-token loss `[b, s]` if `labels` is given, else logits `[b, s, V(/tp)]`.
        """
        if attention_mask is not None:
            raise ValueError("JamCrossModel uses implicit causal masks; pass attention_mask=None")
        h_llm, h_img = self.forward_streams(input_ids, position_ids)
        if not self.post_process:
            return torch.cat([h_llm, h_img], dim=1)  # 2 x [s, b, h] -> [s, 2b, h]
        hidden = self.fusion(h_llm, h_img)  # [s(/tp), b, 2h] -> [s(/tp), b, h]
        weight = self.shared_embedding_or_output_weight() if self.share_embeddings_and_output_weights else None
        logits, _ = self.output_layer(hidden, weight=weight)  # [s, b, V/tp]
        if labels is None:
            return logits.transpose(0, 1).contiguous()
        return self.compute_language_model_loss(labels, logits)
