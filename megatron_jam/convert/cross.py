"""JAM-Cross (paper section 2.1.3): both parents kept whole as two streams of `JamCrossModel`.

Conversion is a renaming: parent layer N becomes `llm.layers.N.*` /
`img.layers.N.*`, each final norm `<stream>.final_layernorm.*`, each learned
position table `embedding.<stream>_position_embeddings.weight`. The shared
input/output embedding takes its text rows [0, T) from the LLM's input
embedding and rows [T, V) from the image model (`vocab.VocabPlan`). The new
parts -- cross blocks every k layers and the fusion linear -- keep the
model's own initialisation: zero output projections (`cross_zero_init`), so
each stream computes exactly its parent at step 0, and fusion = [I/2, I/2].
Parents' own output embeddings are not used (the paper shares one).
"""

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
