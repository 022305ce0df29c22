"""Single-stack JAM models: an imported parent, JAM-Uniform and JAM-Width, as Megatron-Core `GPTModel`s.

Why a config type of its own: JAM-Uniform (eq. 1) has a parent's shape and
JAM-Width (eqs. 2-3) is a parent-family decoder of width d_llm + d_img with
twice the heads (same head size), so all three are one decoder stack that
`ParentConfig` describes. `JamGPTConfig` adds what a checkpoint needs on top
(vocabulary, tied embeddings, sequence length) and is written as
`model_config.json` with `"model_type": "gpt"` next to converted checkpoints;
`models.kinds.load_model_config` reads either type, so the trainer, evaluator and
generator never retype architecture flags. The config lives in `models/config.py`.

JAM-Width needs no special layers: the converter builds every fused weight in
the logical (HF-like) layout, blockwise, and only then packs QKV into
Megatron's grouped layout for 2G query groups, so the llm heads are query
groups [0, G) and the image heads [G, 2G). Megatron's column-parallel split
by query groups and its row-parallel split by input columns then keep every
block whole on its TP rank (tests/test_convert.py checks TP=2 logits against
TP=1).
"""

from torch import Tensor
from megatron.core import parallel_state
from megatron.core.models.gpt import GPTModel
from megatron.core.transformer.transformer_block import get_num_layers_to_build

from megatron_jam.models.builders import parent_transformer_config, scale_word_embeddings
from megatron_jam.models.config import JamGPTConfig, validate_gpt_parallel
from megatron_jam.models.specs import block_spec, parent_layer_spec

class JamGPTModel(GPTModel):
    """Megatron-Core `GPTModel` built from a `JamGPTConfig` (the stage this rank holds).

    Same constructor contract as `JamCrossModel`, so `build_model_chunks(JamGPTModel, cfg, ...)`
    works; `forward(input_ids, position_ids, attention_mask=None, labels=None)` returns logits
    `[b, s, V(/tp)]` or, with labels, the per-token loss `[b, s]`.
    """

    p2p_batch_multiplier = 1

    def __init__(self, cfg: JamGPTConfig, pre_process: bool = True, post_process: bool = True,
                 parallel_output: bool = True, use_te: bool = False, vp_stage: int | None = None, **parallel):
        validate_gpt_parallel(cfg, parallel.get("tensor_model_parallel_size", 1),
                              parallel.get("pipeline_model_parallel_size", 1),
                              parallel.get("virtual_pipeline_model_parallel_size"),
                              parallel.get("sequence_parallel", False))
        p = cfg.parent
        config = parent_transformer_config(p, **parallel)
        n_local = get_num_layers_to_build(config, vp_stage, parallel_state.get_pipeline_model_parallel_rank())
        super().__init__(
            config=config,
            transformer_layer_spec=block_spec(parent_layer_spec(p, use_te), n_local,
                                              p.learnable_norm),
            vocab_size=cfg.padded_vocab_size,
            max_sequence_length=p.max_position_embeddings,
            pre_process=pre_process,
            post_process=post_process,
            parallel_output=parallel_output,
            share_embeddings_and_output_weights=cfg.share_embeddings_and_output_weights,
            position_embedding_type="rope" if p.family == "llama" else "learned_absolute",
            rotary_base=p.rotary_base,
            vp_stage=vp_stage,
        )
        scale_word_embeddings(self, p)
        self.cfg = cfg

    def forward(self, input_ids: Tensor, position_ids: Tensor, attention_mask: Tensor | None = None,
                labels: Tensor | None = None, **kwargs) -> Tensor:
        """Causal masks are implicit (attention_mask=None), as in `JamCrossModel`."""
        return super().forward(input_ids, position_ids, attention_mask, labels=labels, **kwargs)
