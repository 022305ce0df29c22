"""Hugging Face `tokenizer.json` text tokenizers wherever a sentencepiece model is accepted.

Two tiny byte-level BPE tokenizers are trained here with `tokenizers` (A with a
`tokenizer_config.json` naming its eos token and a BOS-adding post-processor like
Llama-3's, B the same size without either). Preprocessing with A must store exactly A's
ids (no BOS: the document layout places `<eos>` itself) plus `<break>` / `<eos>` where
megatron_jam/data/documents.py puts them, read back through Megatron-Core's
IndexedDataset; worker processes load the tokenizer themselves. The type is inferred or
given; a bad path is a one-line error; A and B have different identities and a layout
built with one refuses the other; generation and evaluation run on A's layout; and the
sentencepiece identity is byte-identical to the one existing layouts record.
"""

import io
import json
import os
import random
import sys

import numpy as np
import pytest

from text_helpers import sentence

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "tools"))
import preprocess_interleaved  # noqa: E402

CODEBOOK, PER_IMAGE, SENTINELS, VOCAB = 16, 4, 2, 300


def train_bpe(folder, texts, eos_config=True):
    """A byte-level BPE `tokenizer.json` of exactly VOCAB ids in `folder` (+ tokenizer_config.json)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=["<s>", "</s>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer)
    if eos_config:
        tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 0)])
    folder.mkdir()
    tok.save(str(folder / "tokenizer.json"))
    if eos_config:
        (folder / "tokenizer_config.json").write_text(json.dumps({"eos_token": "</s>", "bos_token": "<s>"}))
    assert tok.get_vocab_size(with_added_tokens=True) == VOCAB
    return tok


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    import sentencepiece as spm

    root = tmp_path_factory.mktemp("hf")
    rng = random.Random(0)
    texts = [sentence(rng) for _ in range(400)]
    hf_a = train_bpe(root / "tok_a", texts)
    hf_b = train_bpe(root / "tok_b", [t[::-1] for t in texts], eos_config=False)
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(texts), model_writer=model, vocab_size=64,
                                   model_type="unigram", hard_vocab_limit=False, character_coverage=1.0)
    (root / "spm.model").write_bytes(model.getvalue())
    docs = []
    for d in range(12):
        content = [{"text": sentence(rng)} if rng.random() < 0.6 else
                   {"image_tokens": [rng.randrange(CODEBOOK) for _ in range(PER_IMAGE)]}
                   for _ in range(rng.randint(1, 4))]
        docs.append({"id": f"d{d}", "content": content})
    text_only = [{"text": sentence(rng) + " naïve — ok"} for _ in range(5)]
    (root / "docs.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs + text_only))
    return {"root": root, "a": hf_a, "b": hf_b, "docs": docs + text_only}


def preprocess(corpus, prefix, tokenizer, *extra):
    root = corpus["root"]
    return preprocess_interleaved.main([
        "--input", str(root / "docs.jsonl"), "--output-prefix", str(prefix), "--tokenizer-model", str(tokenizer),
        "--codebook-size", str(CODEBOOK), "--tokens-per-image", str(PER_IMAGE), "--num-sentinels", str(SENTINELS),
        "--no-progress-bar", *extra])


@pytest.fixture(scope="module")
def shards(corpus, tmp_path_factory):
    prefix = tmp_path_factory.mktemp("shards") / "a"
    assert preprocess(corpus, prefix, corpus["root"] / "tok_a", "--workers", "2", "--chunk-size", "5") == 0
    return prefix


def expected_stream(doc, tok, layout):
    """The document's token stream by the rule of megatron_jam/data/documents.py, from the raw tokenizer."""
    segments = []  # (is_image, ids)
    for item in doc.get("content", [{"text": doc.get("text")}]):
        (kind, value), = item.items()
        if kind == "text":
            ids = tok.encode(value, add_special_tokens=False).ids
            if segments and not segments[-1][0]:
                segments[-1][1].extend(ids)
            else:
                segments.append((False, list(ids)))
        else:
            segments.append((True, [layout.image_offset + c for c in value]))
    out = []
    for i, (is_image, ids) in enumerate(segments):
        if i and (is_image or segments[i - 1][0]):
            out.append(layout.break_id)
        out.extend(ids)
    return out + [layout.eos_id]


def test_preprocessing_stores_the_tokenizers_ids(corpus, shards):
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    from megatron_jam.data.vocab import load_layout

    tok, layout = corpus["a"], load_layout(str(shards))
    assert layout.text_vocab_size == VOCAB and layout.text_tokenizer.startswith("huggingface:sha256:")
    assert layout.eos_id == layout.text_eos_id == tok.token_to_id("</s>")  # reused, as for sentencepiece
    ds = IndexedDataset(str(shards), multimodal=True)
    bounds = ds.index.document_indices
    assert len(bounds) - 1 == len(corpus["docs"])
    for d, doc in enumerate(corpus["docs"]):
        seqs = [ds[int(i)] for i in range(bounds[d], bounds[d + 1])]
        stream = np.concatenate([s[0] for s in seqs]).tolist()
        assert stream == expected_stream(doc, tok, layout), doc["id"] if "id" in doc else d
        for tokens, mode in seqs:
            assert bool(mode) == bool(layout.is_image(tokens).all())
        assert stream[0] != tok.token_to_id("<s>")  # no BOS: special tokens are never added
    first_text_only = len(corpus["docs"]) - 5
    seq = ds[int(bounds[first_text_only])][0]
    assert tok.decode(seq[:-1].tolist()) == corpus["docs"][first_text_only]["text"]


def test_the_inspector_decodes_with_it(corpus, shards, capsys):
    import inspect_dataset

    d = len(corpus["docs"]) - 1
    assert inspect_dataset.main([str(shards), "--document", str(d), "--tokenizer-model",
                                 str(corpus["root"] / "tok_a")]) == 0
    assert corpus["docs"][d]["text"] in capsys.readouterr().out
    assert inspect_dataset.main([str(shards), "--tokenizer-model", str(corpus["root"] / "tok_b")]) == 2
    assert "but the vocabulary layout was built with huggingface:sha256:" in capsys.readouterr().err


def test_instruction_preprocessing_uses_it(corpus, tmp_path):
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    import preprocess_instruct

    tok = corpus["a"]
    record = {"prompt": "ka lo mi", "response": [{"text": "san bu ra"}, {"image_tokens": [1, 2, 3, 4]}]}
    (tmp_path / "sft.jsonl").write_text(json.dumps(record) + "\n")
    prefix = str(tmp_path / "sft")
    assert preprocess_instruct.main(["--input", str(tmp_path / "sft.jsonl"), "--output-prefix", prefix,
                                     "--tokenizer-model", str(corpus["root"] / "tok_a"), "--codebook-size",
                                     str(CODEBOOK), "--tokens-per-image", str(PER_IMAGE)]) == 0
    ds = IndexedDataset(prefix, multimodal=True)
    assert ds[0][0].tolist() == tok.encode("ka lo mi", add_special_tokens=False).ids
    assert ds[1][0].tolist()[:-1] == tok.encode("san bu ra", add_special_tokens=False).ids  # + <break>


def test_type_is_inferred_or_given_and_a_bad_path_is_one_line(corpus, tmp_path, capsys):
    from megatron_jam.data.text_tokenizer import (HUGGINGFACE, SENTENCEPIECE, TextTokenizerError,
                                                  infer_tokenizer_type, load_text_tokenizer)

    root = corpus["root"]
    assert infer_tokenizer_type(str(root / "tok_a")) == HUGGINGFACE
    assert infer_tokenizer_type(str(root / "tok_a" / "tokenizer.json")) == HUGGINGFACE
    assert infer_tokenizer_type(str(root / "spm.model")) == SENTENCEPIECE
    by_file = load_text_tokenizer(str(root / "tok_a" / "tokenizer.json"), HUGGINGFACE)
    by_folder = load_text_tokenizer(str(root / "tok_a"))
    assert by_file.identity == by_folder.identity and by_file.eos_id == by_folder.eos_id == 1
    assert by_folder.encode("ka lo mi") == corpus["a"].encode("ka lo mi", add_special_tokens=False).ids
    assert load_text_tokenizer(str(root / "tok_b")).eos_id is None
    assert preprocess(corpus, tmp_path / "x", root / "tok_a" / "tokenizer.json",
                      "--tokenizer-type", "HuggingFaceTokenizer") == 0
    for path, kind, message in ((tmp_path / "missing", None, "no such file or folder"),
                                (tmp_path, None, "neither a sentencepiece .model file nor"),
                                (root / "tok_a", SENTENCEPIECE, "no such sentencepiece .model file"),
                                (root / "docs.jsonl", HUGGINGFACE, "not a Hugging Face tokenizer.json")):
        with pytest.raises(TextTokenizerError, match=message) as err:
            load_text_tokenizer(str(path), kind)
        assert "\n" not in str(err.value) and str(path) in str(err.value)
    capsys.readouterr()
    assert preprocess(corpus, tmp_path / "y", tmp_path / "missing") == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"--tokenizer-model {tmp_path / 'missing'}: no such file or folder" in err


def test_identities_differ_and_a_layout_refuses_the_other_tokenizer(corpus, shards, tmp_path, capsys):
    from megatron_jam.data.text_tokenizer import load_text_tokenizer
    from megatron_jam.data.vocab import load_layout
    from megatron_jam.inference.loading import GenerationSetupError, file_identity
    from megatron_jam.inference.loading import load_text_tokenizer as load_for_generation

    root, layout = corpus["root"], load_layout(str(shards))
    a, b = load_text_tokenizer(str(root / "tok_a")), load_text_tokenizer(str(root / "tok_b"))
    assert a.identity == layout.text_tokenizer != b.identity and a.vocab_size == b.vocab_size
    sp = load_text_tokenizer(str(root / "spm.model"))
    assert sp.identity == file_identity(str(root / "spm.model"), "sentencepiece")  # existing layouts still match
    with pytest.raises(GenerationSetupError) as err:
        load_for_generation(str(root / "tok_b"), layout)
    assert str(root / "tok_b") in str(err.value) and a.identity in str(err.value) and b.identity in str(err.value)
    with pytest.raises(GenerationSetupError, match=f"has {sp.vocab_size} text ids but the vocabulary layout has "
                                                  f"text_vocab_size={VOCAB}"):
        load_for_generation(str(root / "spm.model"), layout)
    capsys.readouterr()
    layout_file = f"{shards}.vocab.json"
    assert preprocess(corpus, tmp_path / "b", root / "tok_b", "--vocab-layout", layout_file) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "text_tokenizer" in err and layout_file in err
    assert a.identity in err and b.identity in err


def test_the_converter_hashes_a_parent_folder_like_the_layout(corpus, shards):
    from megatron_jam.convert.readers import tokenizer_identity
    from megatron_jam.data.vocab import load_layout

    assert tokenizer_identity(str(corpus["root"] / "tok_a")) == load_layout(str(shards)).text_tokenizer


@pytest.fixture(scope="module")
def checkpoint(corpus, shards, tmp_path_factory):
    """A tiny Llama over the layout's whole vocabulary, imported (single stack)."""
    import megatron_jam  # noqa: F401
    from megatron_jam.convert.checkpoint import ensure_single_rank
    from megatron_jam.data.vocab import load_layout
    from parent_helpers import convert, make_llama

    ensure_single_rank()
    root = tmp_path_factory.mktemp("hfckpt")
    layout = load_layout(str(shards))
    make_llama(root / "llm", seed=3, vocab=layout.vocab_size, initializer_range=0.3)
    convert("import", root / "ckpt", root / "llm", seq_length=32)
    return root / "ckpt", layout


def test_generation_encodes_prompts_and_decodes_text_with_it(single_rank, corpus, shards, checkpoint, tmp_path):
    from tool_loader import load_tool

    ckpt, layout = checkpoint
    tok, prompt = corpus["a"], "ka lo mi ter"
    rc = load_tool("generate_interleaved").main([
        "--load", str(ckpt), "--vocab-layout", f"{shards}.vocab.json", "--tokenizer-model",
        str(corpus["root"] / "tok_a"), "--tokenizer-type", "HuggingFaceTokenizer", "--prompt", prompt,
        "--greedy", "--max-new-tokens", "8", "--output", str(tmp_path), "--no-progress-bar"])
    assert rc == 0
    rec = json.loads((tmp_path / "prompt_0000.json").read_text())
    assert rec["prompt_ids"] == tok.encode(prompt, add_special_tokens=False).ids and rec["prompt"] == prompt
    texts = [s for s in rec["segments"] if s["type"] == "text"]
    assert texts and all(s["text"] == tok.decode(s["ids"]) for s in texts)


def test_evaluation_runs_on_its_shards(single_rank, corpus, shards, checkpoint):
    from eval_helpers import run_evaluate

    ckpt, _ = checkpoint
    got = run_evaluate(["--load", str(ckpt), "--data-path", str(shards), "--max-windows", "4"])
    assert got["multimodal"] and got["tokens"]["all"] > 0 and np.isfinite(got["ppl"]["all"])
