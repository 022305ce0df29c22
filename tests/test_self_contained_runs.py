"""Run folders that are all the tools need (issue 16, items 5, 8, 10).

A tiny run trained on shards made by tools/preprocess_interleaved.py carries its vocabulary layout, its text
tokenizer and its VQ image tokenizer (copied from what preprocessing recorded in PREFIX.stats.json), so
`generate_interleaved --load RUN` and `evaluate --load RUN` work with no tokenizer or layout flag, and a
different tokenizer given explicitly is still refused by hash. A converted checkpoint carries its parent's
tokenizer, and its Hugging Face export loads with `AutoTokenizer` and generates, greedily, what the original
model generates. JAM-Cross export is refused in one line. Preprocessing with `--vocab-layout` takes the
layout's sentinel count unless a flag contradicts it.
"""

import io
import json
import random
import subprocess
import sys

import pytest
from text_helpers import sentence
from tool_loader import load_tool

MODEL = {"model_type": "gpt", "vocab_size": 128, "make_vocab_size_divisible_by": 128, "seq_length": 32,
         "share_embeddings_and_output_weights": True,
         "parent": {"family": "llama", "num_layers": 2, "hidden_size": 32, "num_attention_heads": 4,
                    "num_query_groups": 2, "ffn_hidden_size": 64, "max_position_embeddings": 64,
                    "add_bias_linear": False}}


def _sentencepiece(path, normalization="identity"):
    """A 64-piece model; another normalisation rule gives the same pieces in a different file (hash)."""
    import sentencepiece as spm

    rng, model = random.Random(0), io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter([sentence(rng) for _ in range(300)]), model_writer=model,
                                   vocab_size=64, model_type="unigram", hard_vocab_limit=False,
                                   character_coverage=1.0, normalization_rule_name=normalization)
    path.write_bytes(model.getvalue())
    return str(path)


def _documents(path, rng, n, tokens_per_image=0):
    lines = []
    for i in range(n):
        content = [{"text": sentence(rng)}]
        if tokens_per_image:
            content.append({"image_tokens": [rng.randrange(16) for _ in range(tokens_per_image)]})
        lines.append(json.dumps({"id": i, "content": content}))
    path.write_text("\n".join(lines) + "\n")
    return str(path)


def _preprocess(*argv):
    return load_tool("preprocess_interleaved").main([*map(str, argv), "--workers", "1", "--no-progress-bar"])


@pytest.fixture(scope="module")
def run(tmp_path_factory, single_rank):
    """A 4-step run on a text + image-text blend, --save RUN: the folder the tools then load."""
    from transformers import JanusVQVAE, JanusVQVAEConfig

    from megatron_jam.data.image_tokenizer import VQImageTokenizer
    from megatron_jam.training.loop import main

    root = tmp_path_factory.mktemp("selfcontained")
    spm = _sentencepiece(root / "spm.model")
    JanusVQVAE(JanusVQVAEConfig(embed_dim=8, num_embeddings=16, latent_channels=8, resolution=16, base_channels=32,
                                channel_multiplier=[1, 1, 2], num_res_blocks=1, attn_resolutions=[], num_patches=4)
               ).save_pretrained(root / "vq")
    per_image = VQImageTokenizer(str(root / "vq")).tokens_per_image
    rng = random.Random(1)
    text, imgtext = _documents(root / "text.jsonl", rng, 60), _documents(root / "imgtext.jsonl", rng, 60, per_image)
    common = ["--tokenizer-model", spm, "--image-tokenizer", root / "vq"]
    assert _preprocess("--input", text, "--output-prefix", root / "data" / "text", *common, "--num-sentinels", 8) == 0
    layout = root / "data" / "text.vocab.json"
    # the layout's own sentinel count (8), with no --num-sentinels: the default 32 no longer contradicts it
    assert _preprocess("--input", imgtext, "--output-prefix", root / "data" / "imgtext", *common,
                       "--vocab-layout", layout) == 0
    (root / "model.json").write_text(json.dumps(MODEL))
    main(["--model-config", str(root / "model.json"), "--data-path", "0.5", str(root / "data" / "text"), "0.5",
          str(root / "data" / "imgtext"), "--split", "90,10,0", "--micro-batch-size", "2", "--global-batch-size",
          "2", "--train-iters", "4", "--lr-warmup-iters", "1", "--save", str(root / "run"),
          "--data-cache-path", str(root / "cache"), "--log-interval", "10"])
    return root


def test_the_run_folder_carries_layout_and_tokenizers(run):
    from megatron_jam.data.image_tokenizer import folder_identity
    from megatron_jam.data.vocab import VocabLayout

    layout = VocabLayout.from_json(str(run / "run" / "vocab_layout.json"))
    assert (run / "run" / "tokenizer" / "tokenizer.model").read_bytes() == (run / "spm.model").read_bytes()
    assert folder_identity(str(run / "run" / "image_tokenizer")) == layout.image_tokenizer
    assert layout.num_sentinels == 8
    stats = json.loads((run / "data" / "imgtext.stats.json").read_text())
    assert stats["tokenizer_model"] == str(run / "spm.model")


def test_the_inspector_decodes_with_the_recorded_tokenizer(run, capsys):
    first = json.loads((run / "text.jsonl").read_text().splitlines()[0])["content"][0]["text"]
    assert load_tool("inspect_dataset").main([str(run / "data" / "text"), "--document", "0"]) == 0
    assert first in capsys.readouterr().out


def test_generate_and_evaluate_need_only_the_run_folder(run, tmp_path, capsys):
    out = tmp_path / "gen"
    argv = ["--load", str(run / "run"), "--prompt", "ka lo", "--start-with-image", "--greedy",
            "--max-new-tokens", "20", "--output", str(out), "--no-progress-bar"]
    assert load_tool("generate_interleaved").main(argv) == 0, capsys.readouterr().err
    rec = json.loads((out / "prompt_0000.json").read_text())
    assert rec["prompt"] == "ka lo" and rec["ids"]
    images = [s for s in rec["segments"] if s["type"] == "image"]
    assert images and images[0]["complete"] and images[0]["rendering"] == "decoded"  # by the carried VQ
    capsys.readouterr()
    argv = ["--load", str(run / "run"), "--data-path", str(run / "data" / "text"), "--max-windows", "2"]
    assert load_tool("evaluate").main(argv) == 0, capsys.readouterr().err
    assert json.loads(capsys.readouterr().out)["ppl"]["all"] > 1


def test_a_merge_of_runs_carries_their_layout_and_tokenizers(run, tmp_path, capsys):
    from parent_helpers import convert

    from megatron_jam.data.image_tokenizer import folder_identity
    from megatron_jam.data.vocab import VocabLayout

    layout = str(run / "run" / "vocab_layout.json")
    convert("cross", tmp_path / "cross", run / "run", run / "run", vocab_layout=layout, seq_length=32)
    assert VocabLayout.from_json(str(tmp_path / "cross" / "vocab_layout.json")) == VocabLayout.from_json(layout)
    assert (tmp_path / "cross" / "tokenizer" / "tokenizer.model").read_bytes() == (run / "spm.model").read_bytes()
    # copied byte for byte: the VQ's identity (a hash of its files) is still the layout's
    assert folder_identity(str(tmp_path / "cross" / "image_tokenizer")) == VocabLayout.from_json(layout).image_tokenizer
    argv = ["--load", str(tmp_path / "cross"), "--prompt", "ka", "--max-new-tokens", "4", "--output",
            str(tmp_path / "gen"), "--no-progress-bar"]
    assert load_tool("generate_interleaved").main(argv) == 0, capsys.readouterr().err


def test_a_different_tokenizer_is_refused_by_hash(run, tmp_path, capsys):
    from megatron_jam.data.text_tokenizer import load_text_tokenizer

    other = _sentencepiece(tmp_path / "other.model", normalization="nmt_nfkc")
    assert load_text_tokenizer(other).vocab_size == load_text_tokenizer(str(run / "spm.model")).vocab_size
    argv = ["--load", str(run / "run"), "--tokenizer-model", other, "--prompt", "ka", "--output",
            str(tmp_path / "gen"), "--no-progress-bar"]
    assert load_tool("generate_interleaved").main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "but the vocabulary layout was built with sentencepiece:sha256:" in err


def test_an_explicit_contradicting_sentinel_count_is_refused(run, tmp_path, capsys):
    from megatron_jam.data.vocab import load_layout

    (tmp_path / "chat.jsonl").write_text(json.dumps({"prompt": "ka lo", "response": "mi ter"}) + "\n")
    assert load_tool("preprocess_instruct").main([  # instruction shards take the layout's values too
        "--input", str(tmp_path / "chat.jsonl"), "--output-prefix", str(tmp_path / "chat"), "--tokenizer-model",
        str(run / "spm.model"), "--vocab-layout", str(run / "data" / "text.vocab.json")]) == 0
    chat = load_layout(str(tmp_path / "chat"))
    assert chat.num_sentinels == 8
    chat.check_compatible(load_layout(str(run / "data" / "text")))
    assert _preprocess("--input", run / "text.jsonl", "--output-prefix", tmp_path / "x", "--tokenizer-model",
                       run / "spm.model", "--image-tokenizer", run / "vq", "--num-sentinels", 32,
                       "--vocab-layout", run / "data" / "text.vocab.json") == 2
    err = capsys.readouterr().err.strip()
    assert err.splitlines() == [err] and "--num-sentinels 32 contradicts --vocab-layout" in err and "(8)" in err


HF_CHECK = """
import json, sys, torch
from transformers import AutoModelForCausalLM, AutoTokenizer
exported, original = sys.argv[1:3]
tok = AutoTokenizer.from_pretrained(exported)
ids = torch.tensor([tok("ka lo mi ter").input_ids])
model = AutoModelForCausalLM.from_pretrained(exported).eval()
new = model.generate(ids, max_new_tokens=10, do_sample=False)
ref = AutoModelForCausalLM.from_pretrained(original).eval().generate(
    ids, max_new_tokens=10, do_sample=False, eos_token_id=model.generation_config.eos_token_id,
    pad_token_id=model.generation_config.pad_token_id)
print(json.dumps({"ids": ids[0].tolist(), "new": new[0].tolist(), "ref": ref[0].tolist(),
                  "text": tok.decode(ids[0]), "eos": model.config.eos_token_id, "bos": model.config.bos_token_id}))
"""


def test_hf_export_generates_as_the_original(single_rank, tmp_path, capsys):
    import sentencepiece
    from parent_helpers import make_llama

    hf = tmp_path / "hf"
    make_llama(hf, seed=3, vocab=sentencepiece.SentencePieceProcessor(
        model_file=_sentencepiece(tmp_path / "spm.model")).get_piece_size(), initializer_range=0.3)
    (hf / "tokenizer.model").write_bytes((tmp_path / "spm.model").read_bytes())
    tool = load_tool("convert_checkpoint")
    assert tool.main(["--method", "import", "--load", str(hf), "--save", str(tmp_path / "ckpt")]) == 0
    assert (tmp_path / "ckpt" / "tokenizer" / "tokenizer.model").exists()  # carried from the parent's folder
    assert tool.main(["--method", "export", "--load", str(tmp_path / "ckpt"), "--save", str(tmp_path / "out")]) == 0
    sp = sentencepiece.SentencePieceProcessor(model_file=str(tmp_path / "spm.model"))
    generation = json.loads((tmp_path / "out" / "generation_config.json").read_text())
    assert generation["eos_token_id"] == sp.eos_id() and generation["bos_token_id"] == sp.bos_id()
    done = subprocess.run([sys.executable, "-c", HF_CHECK, str(tmp_path / "out"), str(hf)], check=False,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    got = json.loads(done.stdout.strip().splitlines()[-1])
    assert got["ids"] == sp.encode("ka lo mi ter") and got["text"] == "ka lo mi ter"
    assert got["new"] == got["ref"] and len(got["new"]) > len(got["ids"])
    assert (got["bos"], got["eos"]) == (sp.bos_id(), sp.eos_id())


def test_jam_cross_export_is_refused_in_one_line(tmp_path, capsys):
    import shutil

    from megatron_jam.training.arguments import TINY_CONFIG

    (tmp_path / "cross").mkdir()
    shutil.copyfile(TINY_CONFIG, tmp_path / "cross" / "model_config.json")
    argv = ["--method", "export", "--load", str(tmp_path / "cross"), "--save", str(tmp_path / "hf")]
    assert load_tool("convert_checkpoint").main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.splitlines() == [err] and "JAM-Cross" in err and "no Hugging Face architecture" in err
    assert not (tmp_path / "hf").exists()
