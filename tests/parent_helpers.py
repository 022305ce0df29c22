"""Tiny random Hugging Face parents and the converter, as the conversion, evaluation, generation and
training tests use them.

Parents are tiny random `LlamaForCausalLM` (GQA) / `OPTForCausalLM` models saved with
`save_pretrained` (safetensors); norms and biases are perturbed so that a swapped or forgotten
tensor cannot hide behind an init of ones or zeros. Also here: running the converter in-process,
reading a converted checkpoint back (state dict, logits at TP=1 / TP=2), reading and rewriting a
HF folder's safetensors, and the checks the conversion tests share. tests/test_convert.py tests
the converter itself with these.
"""

import os

import torch

V, S = 100, 12
"""Vocabulary rows of the parents (by default) and the sequence length of `token_ids`."""


def perturb(model):
    """`model` with every norm weight and bias moved off its init (in place), in eval mode."""
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "norm" in n or n.endswith("bias"):
                p.add_(torch.randn_like(p) * 0.1)
    return model.eval()


def make_llama(path, seed=0, vocab=V, tied=False, **kw):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                      rms_norm_eps=1e-5, tie_word_embeddings=tied, **kw)
    model = perturb(LlamaForCausalLM(cfg))
    model.save_pretrained(path)
    return model


def make_opt(path, seed=0, vocab=V, **kw):
    from transformers import OPTConfig, OPTForCausalLM

    torch.manual_seed(seed)
    kw = dict(vocab_size=vocab, hidden_size=32, ffn_dim=64, num_hidden_layers=2, num_attention_heads=4,
              max_position_embeddings=64, word_embed_proj_dim=32, dropout=0.0) | kw
    model = perturb(OPTForCausalLM(OPTConfig(**kw)))
    model.save_pretrained(path)
    return model


def make_gemma(path, seed=0, vocab=V, **kw):
    """A tiny `GemmaForCausalLM` with heads of their own width (4 x 16 over d 32, as Gemma-7B's 16 x 256 over
    3072), GQA 4/2 and tied embeddings."""
    from transformers import GemmaConfig, GemmaForCausalLM

    torch.manual_seed(seed)
    cfg = GemmaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=64,
                      rms_norm_eps=1e-6, **kw)
    model = perturb(GemmaForCausalLM(cfg))
    model.save_pretrained(path)
    return model


MAKERS = {"llama": make_llama, "opt": make_opt}


def convert(method, save, *load, **kw):
    from megatron_jam.convert.pipeline import ConvertOptions, convert as run

    return run(ConvertOptions(method=method, load=tuple(str(p) for p in load), save=str(save), **kw))


def token_ids(lo=0, hi=V, b=2, s=S, seed=0):
    """Random ids [b, s] in [lo, hi)."""
    return torch.randint(lo, hi, (b, s), generator=torch.Generator().manual_seed(seed))


def load_logits(path, ids, tp=1):
    """Logits [b, s, V] of a converted checkpoint at TP=tp (this rank's world)."""
    from megatron_jam.convert.checkpoint import load_checkpoint
    from megatron_jam.models.kinds import load_model_config, model_class
    from megatron_jam.parallel.initialize import initialize_model_parallel
    from megatron_jam.parallel.model import build_model_chunks, parallel_kwargs

    initialize_model_parallel(tp=tp, seed=99)
    cfg = load_model_config(path)
    chunks = build_model_chunks(model_class(cfg), cfg, parallel_kwargs(tp=tp), wrap_ddp=False,
                                parallel_output=False)
    load_checkpoint(chunks, path)
    pos = torch.arange(ids.shape[1]).expand_as(ids)
    with torch.no_grad():
        return chunks[0].eval()(ids, pos)[..., : cfg.vocab_size]


def tp2_logits(path, ids):
    """`load_logits` at TP=2 (what each rank of a two-rank pool runs)."""
    return load_logits(path, ids, tp=2)


def state_of(path):
    """The whole state dict of a converted checkpoint, on this one rank."""
    from megatron_jam.convert.checkpoint import ensure_single_rank, load_state_on_one_rank
    from megatron_jam.models.kinds import load_model_config

    ensure_single_rank()
    return load_state_on_one_rank(str(path), load_model_config(str(path)))


def folder_tensors(path):
    """Every tensor of a HF folder's safetensors files (one file or shards)."""
    from safetensors.torch import load_file

    out = {}
    for f in sorted(os.listdir(path)):
        if f.endswith(".safetensors"):
            out |= load_file(os.path.join(path, f))
    return out


def rewrite_safetensors(path, fn):
    """Replace the tensors of `path`/model.safetensors by `fn(tensors)`."""
    from safetensors.torch import load_file, save_file

    f = path / "model.safetensors"
    save_file(fn(load_file(f)), f, metadata={"format": "pt"})


def hf_logits(model, ids):
    """A transformers model's logits for `ids`, without gradients."""
    with torch.no_grad():
        return model(ids).logits


def rel(got, ref) -> float:
    """Largest absolute difference relative to the largest magnitude of `ref`."""
    return ((got - ref).abs().max() / ref.abs().max()).item()


def no_output(tmp_path, name):
    assert not os.path.exists(tmp_path / name), "a failed conversion must leave no output folder"
    assert not [p for p in os.listdir(tmp_path) if p.startswith(name + ".tmp-")]
