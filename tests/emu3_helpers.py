"""A tiny "Emu3-like" tokenizer folder, built in-process (no download).

Emu3's tokenizer is Qwen's byte-level BPE (digits split one per token) followed
by special tokens in this order: `<|endoftext|>`, `<|im_start|>`, `<|im_end|>`,
`<|extra_0|>` .. `<|extra_204|>` (`<|extra_200|>` end of line, `<|extra_201|>`
end of frame, `<|extra_204|>` eos), `<|image token|>`, `<|image start|>`,
`<|image end|>`, then `<|visual token 000000|>` .. one per VQ code. Here the
BPE has BPE_SIZE ids and the codebook CODEBOOK codes, so the structure (and
every lookup by token string) is Emu3's at a small scale.

Also a tiny random Emu3 parent model (`make_emu3`: a Llama body plus a VQ-VAE, saved
with `save_pretrained`), shared by the Emu3 conversion, mixed-tokenizer and
image-format tests.
"""

import json
import os

BPE_SIZE, CODEBOOK, EXTRAS = 300, 64, 205
SPECIALS = (["<|endoftext|>", "<|im_start|>", "<|im_end|>"] + [f"<|extra_{i}|>" for i in range(EXTRAS)]
            + ["<|image token|>", "<|image start|>", "<|image end|>"])
CODE0 = BPE_SIZE + len(SPECIALS)
"""Id of visual token 0 (Emu3: 151,854)."""
TEXTS = ["a red square on a blue field", "the cat sat on the mat 12 times", "images of 90*90 codes",
         "three small green circles", "hello world, this is a tiny corpus 0123456789"] * 20


def make_emu3_tokenizer(folder: str, codebook: int = CODEBOOK, eos: bool = True) -> str:
    """Write tokenizer.json (+ tokenizer_config.json naming `<|extra_204|>` as eos) into `folder`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                 pre_tokenizers.ByteLevel(add_prefix_space=False)])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=BPE_SIZE, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(TEXTS, trainer)
    assert tok.get_vocab_size() == BPE_SIZE
    tok.add_special_tokens(SPECIALS + [f"<|visual token {c:06d}|>" for c in range(codebook)])
    os.makedirs(folder, exist_ok=True)
    tok.save(os.path.join(folder, "tokenizer.json"))
    if eos:
        with open(os.path.join(folder, "tokenizer_config.json"), "w") as f:
            json.dump({"eos_token": "<|extra_204|>", "bos_token": "<|extra_203|>"}, f)
    return folder


def extra(i: int) -> int:
    """Id of `<|extra_i|>` in the tiny tokenizer."""
    return BPE_SIZE + 3 + i


EOL, EOF, EOS = extra(200), extra(201), extra(204)
IMAGE_TOKEN, IMAGE_START, IMAGE_END = BPE_SIZE + 3 + EXTRAS, BPE_SIZE + 4 + EXTRAS, BPE_SIZE + 5 + EXTRAS


# ------------------------------------------------------------------ a tiny Emu3 parent model
PARENT_VOCAB = 100
"""Vocabulary rows of `make_emu3`'s parents (by default); `<image>` is the last row."""
PARENT_TEXT = dict(vocab_size=PARENT_VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, rms_norm_eps=1e-5,
                   pad_token_id=0, bos_token_id=1, eos_token_id=2)
PARENT_VQ = dict(codebook_size=16, embed_dim=4, latent_channels=4, base_channels=32, channel_multiplier=[1, 1],
                 num_res_blocks=1, attn_resolutions=[], hidden_size=32, num_attention_heads=1)


def make_emu3(path, seed=0, vq=True, **text):
    """A random Emu3ForConditionalGeneration saved with save_pretrained (norms and biases perturbed)."""
    import torch
    from transformers import Emu3Config, Emu3ForConditionalGeneration

    from parent_helpers import perturb, rewrite_safetensors

    torch.manual_seed(seed)
    cfg = Emu3Config(text_config=PARENT_TEXT | text, vq_config=PARENT_VQ,
                     vocabulary_map={"<image>": PARENT_VOCAB - 1})
    model = perturb(Emu3ForConditionalGeneration(cfg))
    model.save_pretrained(path)
    if not vq:
        rewrite_safetensors(path, lambda sd: {k: v for k, v in sd.items() if not k.startswith("vqmodel.")})
    return model
