"""Chameleon end to end through the user's tools: two tiny Chameleon parents (the Chameleon-7B + Lumina-mGPT-7B
setting: one tokenizer, different weights) -> the image tokenizer converted once from a Meta-style `vqgan.ckpt`
(tools/convert_image_tokenizer.py: transformers' encoder plus the project's VQGAN decoder) -> shards of real PNG
files in Chameleon's native layout and image format (tools/preprocess_interleaved.py) -> JAM-Cross
(tools/convert_checkpoint.py) -> training (loss falls, TP=2 + SP) -> generation (tools/generate_interleaved.py)
whose images are decoded by the project's decoder.

The parents' vocabulary follows Chameleon's order (tests/chameleon_helpers.py: specials 0..3, image-code BPE
tokens `IMGIMG...Z` at 4.. in shuffled code order, `<eoss>`, `<racm3:break>`, reserved tokens, then text), so the
cross merge must take the code rows (4..67, not a prefix) from the image parent and every other row from the LLM.
"""

import json
import math
import shutil

import numpy as np
import pytest
import torch

from chameleon_helpers import CODEBOOK, make_chameleon_model_folder
from parent_helpers import perturb
from tool_loader import load_tool

SEQ = 96
VQ = dict(embed_dim=8, num_embeddings=CODEBOOK, latent_channels=8, resolution=32, base_channels=32,
          channel_multiplier=[1, 1, 2], num_res_blocks=1, attn_resolutions=[])
"""A tiny VQ: 32 px -> an 8x8 grid of codes (64 per image)."""
BODY = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            max_position_embeddings=256, rms_norm_eps=1e-5)


def make_parent(folder, seed, tokenizer_from=None):
    """A random ChameleonForConditionalGeneration saved next to the tiny Chameleon tokenizer."""
    from transformers import ChameleonConfig, ChameleonForConditionalGeneration

    if tokenizer_from is None:
        make_chameleon_model_folder(str(folder))
    else:
        shutil.copytree(tokenizer_from, folder)
    vocab = json.loads((folder / "config.json").read_text())["vocabulary_map"]
    torch.manual_seed(seed)
    cfg = ChameleonConfig(**BODY, vocab_size=len(vocab), vq_config=VQ, vocabulary_map=vocab, bos_token_id=0,
                          pad_token_id=1, eos_token_id=2, initializer_range=0.2)
    model = perturb(ChameleonForConditionalGeneration(cfg))
    model.save_pretrained(folder)
    return model


def write_vqgan_ckpt(path, gen):
    """What Meta released (tokenizer/vqgan.ckpt): a Lightning dict whose `state_dict` holds the encoder, the
    codebook, quant_conv / post_quant_conv (the names transformers keeps) and the `decoder.*` tensors."""
    from megatron_jam.data.chameleon_vqgan import ChameleonVQGANDecoder

    torch.manual_seed(3)
    decoder = ChameleonVQGANDecoder(gen.model.vqmodel.config)
    state = {k: v.detach().clone() for k, v in gen.model.vqmodel.state_dict().items()}
    state |= {"decoder." + k: v.detach().clone() for k, v in decoder.state_dict().items()}
    torch.save({"state_dict": state, "epoch": 0}, path)


def draw_images(folder):
    from PIL import Image, ImageDraw

    for k, colour in enumerate([(220, 30, 30), (30, 30, 220), (30, 180, 30)]):
        im = Image.new("RGB", (32, 32), (255, 255, 255))
        ImageDraw.Draw(im).rectangle([6 + k, 6, 24, 26 - k], fill=colour)
        im.save(folder / f"{k}.png")


def write_corpus(path):
    docs = [[{"text": "a red square on a blue field"}, {"image": "0.png"}, {"text": "three small green circles"}],
            [{"image": "1.png"}, {"text": "the cat sat on the mat 12 times"}, {"image": "2.png"}],
            [{"text": "hello world, this is a tiny corpus"}, {"image": "2.png"}]]
    path.write_text("".join(json.dumps({"id": i, "content": d}) + "\n" for i, d in enumerate(docs * 4)))


def tool(name, *argv):
    return load_tool(name).main([str(a) for a in argv])


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    import megatron_jam  # noqa: F401
    from megatron_jam.convert.checkpoint import ensure_single_rank

    ensure_single_rank()
    root = tmp_path_factory.mktemp("chameleon_e2e")
    chat = make_parent(root / "chat", seed=1)
    gen = make_parent(root / "gen", seed=2, tokenizer_from=root / "chat")
    write_vqgan_ckpt(root / "vqgan.ckpt", gen)
    assert tool("convert_image_tokenizer", "--load", root / "vqgan.ckpt", "--config", root / "gen" / "config.json",
                "--save", root / "vq") == 0
    draw_images(root)
    write_corpus(root / "docs.jsonl")
    prefix = root / "data" / "cham"
    assert tool("preprocess_interleaved", "--input", root / "docs.jsonl", "--output-prefix", prefix,
                "--tokenizer-model", root / "gen", "--vocab-layout-kind", "native", "--native-format", "chameleon",
                "--image-tokenizer", root / "vq", "--num-sentinels", 4, "--workers", 1, "--no-progress-bar") == 0
    assert tool("convert_checkpoint", "--method", "cross", "--llm", root / "chat", "--img", root / "gen",
                "--cross-every", 1, "--vocab-layout", f"{prefix}.vocab.json", "--seq-length", SEQ,
                "--save", root / "cross") == 0
    return {"root": root, "chat": chat, "gen": gen, "prefix": str(prefix)}


def test_code_rows_come_from_the_image_parent_and_streams_equal_the_parents(single_rank, world):
    from megatron_jam.convert.checkpoint import build_single, load_checkpoint
    from megatron_jam.data.vocab import VocabLayout
    from megatron_jam.models.kinds import load_model_config

    layout = VocabLayout.from_json(world["prefix"] + ".vocab.json")
    codes = layout.image_ids(np.arange(CODEBOOK))
    assert codes.min() == 4 and codes.max() == 3 + CODEBOOK and layout.image_format == "chameleon"
    model = build_single(load_model_config(str(world["root"] / "cross")))
    load_checkpoint([model], str(world["root"] / "cross"))
    emb = model.embedding.word_embeddings.weight.detach()
    chat_emb, gen_emb = (m.get_input_embeddings().weight.detach() for m in (world["chat"], world["gen"]))
    is_code = np.zeros(layout.vocab_size, dtype=bool)
    is_code[codes] = True
    assert torch.equal(emb[: layout.vocab_size][is_code], gen_emb[is_code])
    assert torch.equal(emb[: layout.vocab_size][~is_code], chat_emb[~is_code])
    g = torch.Generator().manual_seed(0)
    text = torch.randint(200, layout.vocab_size, (2, 12), generator=g)
    image = torch.as_tensor(codes)[torch.randint(0, CODEBOOK, (2, 12), generator=g)]
    pos = torch.arange(12).expand(2, 12)
    with torch.no_grad():
        for ids, k, parent in ((text, 0, world["chat"]), (image, 1, world["gen"])):
            got = model.eval().forward_streams(ids, pos)[k].transpose(0, 1)
            want = parent.model(ids).last_hidden_state
            assert ((got - want).abs().max() / want.abs().max()).item() < 1e-4


def _train(argv):
    from megatron_jam.training.loop import main

    return [r["lm_loss"] for r in main(argv)]


def test_cross_trains_on_the_shards_at_tp2_with_sp(pool2, world, tmp_path):
    argv = ["--load", str(world["root"] / "cross"), "--data-path", world["prefix"], "--split", "100,0,0",
            "--seq-length", str(SEQ), "--micro-batch-size", "2", "--global-batch-size", "4", "--train-iters", "6",
            "--lr", "1e-2", "--lr-warmup-iters", "0", "--lr-decay-style", "constant",
            "--tensor-model-parallel-size", "2", "--sequence-parallel", "--save", str(tmp_path / "run"),
            "--save-interval", "6", "--data-cache-path", str(tmp_path / "cache")]
    curve = next(c for c in pool2.run(_train, argv) if not math.isnan(c[0]))
    print("chameleon cross loss curve:", [round(x, 4) for x in curve])
    assert len(curve) == 6 and all(math.isfinite(x) for x in curve) and curve[-1] < curve[0], curve
    world["trained"] = tmp_path / "run"


def test_generation_decodes_images_with_the_projects_decoder(single_rank, world, tmp_path, capsys):
    from PIL import Image

    load = world.get("trained", world["root"] / "cross")
    argv = ["--load", load, "--vocab-layout", world["prefix"] + ".vocab.json", "--tokenizer-model",
            world["root"] / "gen", "--image-tokenizer", world["root"] / "vq", "--prompt", "a red square",
            "--start-with-image", "--cfg-scale", "2", "--max-new-tokens", "80", "--seed", "1",
            "--output", tmp_path / "out", "--no-progress-bar"]
    assert tool("generate_interleaved", *argv) == 0, capsys.readouterr().err
    rec = json.loads((tmp_path / "out" / "prompt_0000.json").read_text())
    images = [s for s in rec["segments"] if s["type"] == "image"]
    assert images and all(s["complete"] and s["rendering"] == "decoded" for s in images), rec["segments"]
    for seg in images:
        assert tuple(seg["grid"]) == (8, 8) and len(seg["codes"]) == 64
        assert Image.open(tmp_path / "out" / seg["file"]).size == (32, 32)
    page = (tmp_path / "out" / "index.html").read_text()
    assert page.count("<img ") == len(images) and "decoded with the VQ decoder" in page
