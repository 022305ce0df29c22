"""A tiny "Chameleon-like" model folder, built in-process (no download).

Chameleon's tokenizer.json (65,536 ids) begins with `<s>` `<pad>` `</s>` `<unk>`
(0..3), then the 8,192 image-code tokens `IMGIMG<letters>Z` (ids 4..8195, in no
code order), `<eoss>` (8196), `<racm3:break>` (8197), reserved tokens
`<reservedNNNNN>` (among them `<reserved08706>`, end of turn, and
`<reserved08707>`, which transformers' conversion renames `<image>`), then the
BPE text tokens. Here the codebook has CODEBOOK codes placed at ids 4.. in a
shuffled code order, only the reserved tokens the family uses plus a block from
`<reserved08900>` exist, and the BPE is trained on a few sentences; every lookup
by token string is Chameleon's. config.json carries `vocabulary_map` (the whole
vocabulary, `<image>` included) as transformers' conversion writes it.

Also a tiny random Chameleon parent model (`make_chameleon`: a Llama body with
per-head q/k LayerNorm plus a VQ encoder, saved with `save_pretrained`), shared by
the Chameleon conversion and the generation tests.
"""

import json
import os

import numpy as np

CODEBOOK, BPE_SIZE = 64, 300
TEXTS = ["a red square on a blue field", "the cat sat on the mat 12 times", "three small green circles",
         "hello world, this is a tiny corpus 0123456789"] * 20
HEAD = ["<s>", "<pad>", "</s>", "<unk>"]
RESERVED = ([8706, 8707] + list(range(8796, 8800)) + list(range(8800, 8865)) + list(range(8900, 8940)))


def code_name(code: int) -> str:
    """Chameleon's name of image code `code`: its decimal digits as letters A..J between IMGIMG and Z."""
    return "IMGIMG" + "".join(chr(ord("A") + int(d)) for d in str(code)) + "Z"


def code_order(codebook: int = CODEBOOK, seed: int = 0) -> list:
    """code -> id of the tiny vocabulary: ids 4 .. 4 + codebook - 1 in a shuffled code order."""
    perm = np.random.default_rng(seed).permutation(codebook)
    return [4 + int(i) for i in np.argsort(perm)]  # id 4 + k holds code perm[k]


def special_tokens(codebook: int = CODEBOOK) -> list:
    """Token strings of ids 0 .. (everything before the text BPE), in id order."""
    code_at = np.empty(codebook, dtype=object)
    for code, tid in enumerate(code_order(codebook)):
        code_at[tid - 4] = code_name(code)
    reserved = ["<image>" if n == 8707 else f"<reserved{n:05d}>" for n in RESERVED]
    return HEAD + list(code_at) + ["<eoss>", "<racm3:break>"] + reserved


def make_chameleon_model_folder(folder: str, codebook: int = CODEBOOK, lumina: bool = False,
                                vocab_size: int = 0) -> str:
    """Write tokenizer.json, tokenizer_config.json and config.json (with vocabulary_map) into `folder`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    trained = Tokenizer(models.BPE())
    trained.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trained.train_from_iterator(TEXTS, trainers.BpeTrainer(vocab_size=BPE_SIZE, show_progress=False,
                                                           initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    model = json.loads(trained.to_str())["model"]
    specials = special_tokens(codebook)
    vocab = {tok: i for i, tok in enumerate(specials)}
    vocab |= {tok: len(specials) + i for tok, i in model["vocab"].items()}
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in model["merges"]]
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([t for t in specials if not t.startswith("IMGIMG")])
    os.makedirs(folder, exist_ok=True)
    tok.save(os.path.join(folder, "tokenizer.json"))
    with open(os.path.join(folder, "tokenizer_config.json"), "w") as f:
        json.dump({"eos_token": "</s>", "bos_token": "<s>", "pad_token": "<pad>"}, f)
    arch = "ChameleonXLLMXForConditionalGeneration" if lumina else "ChameleonForConditionalGeneration"
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump({"model_type": "chameleon", "architectures": [arch], "vocab_size": vocab_size or len(vocab),
                   "bos_token_id": 0, "pad_token_id": 1, "eos_token_id": 2, "vocabulary_map": vocab}, f)
    return folder


def token_id(folder: str, token: str) -> int:
    """Id of `token` in the folder's tokenizer.json."""
    from tokenizers import Tokenizer

    return int(Tokenizer.from_file(os.path.join(folder, "tokenizer.json")).token_to_id(token))


# ------------------------------------------------------------------ a tiny Chameleon parent model
PARENT_VOCAB, PARENT_TEXT_ROWS = 100, 60
"""Vocabulary rows of `make_chameleon`'s parents (by default) and where their image codes begin."""
PARENT_BODY = dict(vocab_size=PARENT_VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, rms_norm_eps=1e-5)
PARENT_VQ = dict(embed_dim=8, num_embeddings=16, latent_channels=8, resolution=16, base_channels=32,
                 channel_multiplier=[1, 2], num_res_blocks=1)
PARENT_VOCABULARY_MAP = ({f"IMGIMG{chr(65 + i)}Z": PARENT_TEXT_ROWS + 3 * i for i in range(10)}
                         | {"<image>": PARENT_VOCAB - 1})


def make_chameleon(path, seed=0, **body):
    """A random ChameleonForConditionalGeneration saved with save_pretrained (norms and biases perturbed)."""
    import torch
    from transformers import ChameleonConfig, ChameleonForConditionalGeneration

    from parent_helpers import perturb

    torch.manual_seed(seed)
    cfg = ChameleonConfig(**(PARENT_BODY | body), vq_config=PARENT_VQ, vocabulary_map=PARENT_VOCABULARY_MAP)
    model = perturb(ChameleonForConditionalGeneration(cfg))
    model.save_pretrained(path)
    return model
