"""JAM-Cross (paper section 2.1.3): both parents kept whole as two streams of `JamCrossModel`.

Conversion is a renaming: parent layer N becomes `llm.layers.N.*` /
`img.layers.N.*`, each final norm `<stream>.final_layernorm.*`, each learned
position table `embedding.<stream>_position_embeddings.weight`. The shared
input/output embedding takes its text rows [0, T) from the LLM's input
embedding and rows [T, V) from the image model (`vocab.VocabPlan`). The new
parts -- cross blocks every k layers and the fusion linear -- are built by the
model's own code and initialisation (Megatron's init methods; zero output
projections as `cross_zero_init`, so each stream computes exactly its parent
at step 0; fusion = [I/2, I/2]), one block pair at a time, each from its own
seed (`--seed` + its index), so that the converter can stream them.
Parents' own output embeddings are not used (the paper shares one).
"""

import torch
from torch import Tensor

from megatron_jam.convert.common import EMB, FINAL, HF_EXTRA, OUT, POS, ConvertError, rename
from megatron_jam.convert.vocab import VocabPlan
from megatron_jam.models.config import ConfigError, JamCrossConfig, ParentConfig


def cross_config(a: ParentConfig, b: ParentConfig, plan: VocabPlan, cross_every: int,
                 seq_length: int) -> JamCrossConfig:
    try:
        return JamCrossConfig(llm=a, img=b, vocab_size=plan.vocab_size, cross_every=cross_every,
                              cross_zero_init=True, share_embeddings_and_output_weights=True,
                              seq_length=seq_length)
    except ConfigError as e:
        raise ConvertError(f"--method cross cannot fuse these parents: {e}") from e


def cross_part(a: dict[str, Tensor], b: dict[str, Tensor], plan: VocabPlan) -> dict[str, Tensor]:
    """One part of both parents (canonical keys) -> JamCrossModel keys."""
    out = {}
    for stream, sd in (("llm", a), ("img", b)):
        sd = {k: v for k, v in sd.items() if not k.startswith(HF_EXTRA) and k != OUT}
        out |= rename(sd, "decoder.layers.", f"{stream}.layers.")
        out |= rename(sd, FINAL, f"{stream}.final_layernorm.")
        if POS in sd:
            out[f"embedding.{stream}_position_embeddings.weight"] = sd[POS]
    if (EMB in a) != (EMB in b):
        raise ConvertError(f"tensor {EMB} is missing from the {'img' if EMB in a else 'llm'} parent")
    if EMB in a:
        if a[EMB].shape[1] != b[EMB].shape[1]:
            raise ConvertError(f"tensor {EMB}: llm shape {tuple(a[EMB].shape)} and img shape "
                               f"{tuple(b[EMB].shape)} differ in width")
        out[EMB] = plan.fuse(a[EMB], b[EMB], lambda x, y: x, lambda y: y)
    return out


def new_parts(cfg: JamCrossConfig) -> list:
    """The parts JAM-Cross adds: ('cross', K) for each cross-block pair, then ('fusion',)."""
    return [("cross", k) for k in range(cfg.num_cross_pairs)] + [("fusion",)]


def new_part(cfg: JamCrossConfig, part: tuple, seed: int, bf16: bool = False) -> dict[str, Tensor]:
    """One new part, initialised alone: cross-block pair K (both directions) or the fusion linear."""
    from megatron.core.transformer.spec_utils import build_module

    from megatron_jam.models.builders import cross_transformer_config, parent_transformer_config
    from megatron_jam.models.jam_cross import STREAMS, FusionLinear, zero_cross_layer_outputs
    from megatron_jam.models.specs import cross_layer_spec
    from megatron_jam.parallel.model import parallel_kwargs

    kw = parallel_kwargs(bf16=bf16, perform_initialization=True, use_cpu_initialization=True)
    if part == ("fusion",):
        fusion = FusionLinear(parent_transformer_config(cfg.llm, **kw))
        return {"fusion." + k: t for k, t in fusion.state_dict().items()}
    _, k = part
    out = {}
    for s, name in enumerate(STREAMS):
        p: ParentConfig = getattr(cfg, name)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed + 1 + 2 * k + s)
            layer = build_module(cross_layer_spec(p.learnable_norm), config=cross_transformer_config(cfg, p, **kw),
                                 layer_number=k + 1)
        zero_cross_layer_outputs(layer)
        out |= {f"{name}_cross.layers.{k}.{key}": t for key, t in layer.state_dict().items()
                if isinstance(t, Tensor)}
    return out
