"""Parents with different text tokenizers (Llama-3-8B + Emu3-Gen at a tiny scale): JAM-Cross only.

The LLM is a tiny random `LlamaForCausalLM` with its own byte-level BPE (Llama-3's kind:
`<|begin_of_text|>`, `<|end_of_text|>` as eos, reserved special tokens, digits not split);
the image parent a tiny random `Emu3ForConditionalGeneration` with the Emu3-like tokenizer
of tests/emu3_helpers.py. Both are built in-process. Checked: the mixed layout (LLM text
ids, Emu3's image part re-indexed after them) from tools/preprocess_interleaved.py, its
JSON round trip and the readers' checks; uniform and width refused with both tokenizers
named (also for a parent imported first, through its recorded identity); cross refused
without a mixed layout or with another parent's; JAM-Cross's streams equal the LLM on text
ids and the Emu3 parent on re-indexed image tokens at step 0 (appended specials start at
zero); and the generator writes a well-formed Emu3 image through the layout with the LLM's
tokenizer and refuses Emu3's.
"""

import json
import os
import re
import shutil
import sys

import numpy as np
import pytest
import torch

from emu3_helpers import CODE0, EOF, EOL, IMAGE_END, IMAGE_START, IMAGE_TOKEN, extra, make_emu3, make_emu3_tokenizer
from megatron_jam.convert.common import ConvertError
from megatron_jam.data.mixed_vocab import image_parent_ids, mixed_layout
from megatron_jam.data.text_tokenizer import TextTokenizerError, check_layout, load_text_tokenizer
from megatron_jam.data.vocab import VocabLayout, VocabLayoutError, load_layout
from parent_helpers import convert, make_llama, no_output, rel, token_ids

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "tools"))
import preprocess_interleaved  # noqa: E402

S, SENTINELS, GRID = 12, 4, (2, 3)
EMU3_ROWS = CODE0 + 64
"""Rows of the tiny Emu3 parent: its tokenizer's ids (BPE, specials, 64 visual tokens)."""
LLM_TEXTS = ["the quick brown fox jumps over 123 lazy dogs", "a picture of a red square", "llamas eat grass"] * 20


def make_llm_tokenizer(folder) -> str:
    """A Llama-3-like tokenizer.json: byte-level BPE (digits grouped), then its special tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(LLM_TEXTS, trainers.BpeTrainer(
        vocab_size=280, show_progress=False, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok.add_special_tokens(["<|begin_of_text|>", "<|end_of_text|>"] + [f"<|reserved_special_token_{i}|>"
                                                                      for i in range(4)])
    os.makedirs(folder, exist_ok=True)
    tok.save(os.path.join(folder, "tokenizer.json"))
    with open(os.path.join(folder, "tokenizer_config.json"), "w") as f:
        json.dump({"eos_token": "<|end_of_text|>", "bos_token": "<|begin_of_text|>"}, f)
    return str(folder)


@pytest.fixture(scope="module")
def parents(tmp_path_factory):
    """(root, llm folder, llm model, emu3 folder, emu3 model, mixed layout prefix): HF folders with tokenizers."""
    import megatron_jam  # noqa: F401
    from megatron_jam.convert.checkpoint import ensure_single_rank

    ensure_single_rank()
    root = tmp_path_factory.mktemp("mixed")
    make_llm_tokenizer(root / "tok")
    t = load_text_tokenizer(str(root / "tok")).vocab_size
    llm = make_llama(root / "llm", seed=1, vocab=t + 2)  # 2 padding rows, dropped
    make_llm_tokenizer(root / "llm")
    gen = make_emu3(root / "gen", seed=2, vocab_size=EMU3_ROWS)
    make_emu3_tokenizer(str(root / "gen"))
    return root, root / "llm", llm, root / "gen", gen


def _preprocess(root, prefix, *extra_args):
    doc = {"content": [{"text": "a red square"}, {"image_tokens": [[1, 2, 3], [4, 5, 6]]}, {"text": "llamas"}]}
    src = root / "docs.jsonl"
    src.write_text(json.dumps(doc) + "\n")
    return preprocess_interleaved.main(["--input", str(src), "--output-prefix", str(prefix), "--tokenizer-model",
                                        str(root / "llm"), "--vocab-layout-kind", "mixed", "--image-parent-tokenizer",
                                        str(root / "gen"), "--num-sentinels", str(SENTINELS), "--image-grid",
                                        *map(str, GRID), "--no-progress-bar", *extra_args])


@pytest.fixture(scope="module")
def layout_prefix(parents):
    root = parents[0]
    assert _preprocess(root, root / "shards" / "mix") == 0
    return str(root / "shards" / "mix")


# ------------------------------------------------------------------ the layout


def test_mixed_layout_text_is_the_llm_and_the_image_part_is_emu3(parents, layout_prefix):
    root, llm_dir, _, gen_dir, _ = parents
    layout = load_layout(layout_prefix)
    llm_tok, emu3_tok = load_text_tokenizer(str(llm_dir)), load_text_tokenizer(str(gen_dir))
    t = llm_tok.vocab_size
    assert layout.mixed and layout.native and layout.image_format == "emu3"
    assert layout.text_vocab_size == layout.text_rows == t and layout.eos_id == layout.text_eos_id == llm_tok.eos_id
    assert layout.text_tokenizer == llm_tok.identity and layout.image_parent_tokenizer == emu3_tok.identity
    part = np.arange(t, layout.parent_vocab_size)
    parent = image_parent_ids(layout, part)
    assert (np.diff(parent) > 0).all(), "the image part keeps the image parent's id order"
    assert set(parent.tolist()) == set(range(CODE0 - 3, EMU3_ROWS)) | {EOL, EOF} | {
        extra(i) for i in range(SENTINELS + 2)} | {emu3_tok.encode(c)[0] for c in "0123456789*"}
    back = {name: int(image_parent_ids(layout, [i])[0]) for name, i in layout.image_markers.items()}
    assert back == {"image_start": IMAGE_START, "size_end": IMAGE_TOKEN, "end_of_line": EOL, "end_of_frame": EOF,
                    "image_end": IMAGE_END}
    assert image_parent_ids(layout, layout.image_ids(np.arange(64))).tolist() == list(range(CODE0, EMU3_ROWS))
    assert image_parent_ids(layout, [layout.sentinel_id(0), layout.mask_id]).tolist() == [extra(0), extra(5)]
    assert layout.is_text(np.arange(t)).sum() == t - 6 and not layout.is_text(part).any()
    assert VocabLayout.from_json(layout.to_json()) == layout
    with pytest.raises(VocabLayoutError, match="not in the image part"):
        image_parent_ids(layout, [5])


def test_readers_check_the_mixed_layout(parents, layout_prefix):
    root, llm_dir, _, gen_dir, _ = parents
    layout = load_layout(layout_prefix)
    check_layout(load_text_tokenizer(str(llm_dir)), layout)  # generation and the inspector read text with the LLM's
    with pytest.raises(TextTokenizerError, match="text ids but the vocabulary layout has text_vocab_size"):
        check_layout(load_text_tokenizer(str(gen_dir)), layout)
    other = mixed_layout(str(llm_dir), str(gen_dir), num_sentinels=SENTINELS, image_grid=GRID, specials="appended")
    assert other.parent_vocab_size == layout.parent_vocab_size - SENTINELS - 2
    assert sorted(other.appended_specials.values()) == list(range(other.parent_vocab_size, other.vocab_size))
    with pytest.raises(VocabLayoutError, match="incompatible vocabulary layouts: .*image_parent_rows"):
        layout.check_compatible(other)
    data = json.loads(layout.to_json())
    data["image_parent_rows"][0][2] += 1  # a gap / overlap in the row map
    data.pop("derived")
    with pytest.raises(VocabLayoutError, match="mixed VocabLayout: image_parent_rows must tile"):
        VocabLayout.from_dict(data)


def test_preprocess_writes_llm_text_and_reindexed_emu3_images(parents, layout_prefix):
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    root, llm_dir, _, gen_dir, _ = parents
    layout, llm_tok, emu3_tok = load_layout(layout_prefix), load_text_tokenizer(str(llm_dir)), \
        load_text_tokenizer(str(gen_dir))
    ds = IndexedDataset(layout_prefix, multimodal=True)
    got = [ds[i][0].tolist() for i in range(len(ds))]
    assert ds.index.sequence_modes.tolist() == [0, 1, 0]
    assert got[0] == llm_tok.encode("a red square") and got[2] == llm_tok.encode("llamas") + [llm_tok.eos_id]
    emu3 = "<|image start|>2*3<|image token|>" + "".join(
        "".join(f"<|visual token {c:06d}|>" for c in row) + "<|extra_200|>" for row in [[1, 2, 3], [4, 5, 6]]) + \
        "<|extra_201|><|image end|>"
    assert image_parent_ids(layout, got[1]).tolist() == emu3_tok.encode(emu3), "Emu3's own image, re-indexed"
    assert _preprocess(root, root / "again", "--vocab-layout", layout_prefix + ".vocab.json") == 0
    assert load_layout(str(root / "again")) == layout
    assert _preprocess(root, root / "bad", "--tokens-per-image", "16") == 2


# ------------------------------------------------------------------ the converter


@pytest.mark.parametrize("method,why", [("uniform", "averages (eq. 1)"), ("width", "stacks (eq. 2)")])
def test_uniform_and_width_refuse_different_tokenizers(single_rank, parents, tmp_path, method, why):
    root, llm_dir, _, gen_dir, _ = parents
    ids = [load_text_tokenizer(str(d)).identity for d in (llm_dir, gen_dir)]
    message = (f"--method {method} cannot fuse parents whose text tokenizers differ: LLM {llm_dir}/tokenizer.json "
               f"({ids[0]}), image model {gen_dir}/tokenizer.json ({ids[1]}); it {why} embedding rows id by id")
    with pytest.raises(ConvertError, match=re.escape(message)):
        convert(method, tmp_path / "out", llm_dir, gen_dir)
    no_output(tmp_path, "out")


def test_cross_needs_the_mixed_layout_of_these_parents(single_rank, parents, layout_prefix, tmp_path):
    root, llm_dir, _, gen_dir, _ = parents
    with pytest.raises(ConvertError, match="tokenizers differ .*--method cross needs a mixed --vocab-layout"):
        convert("cross", tmp_path / "out", llm_dir, gen_dir)
    with pytest.raises(ConvertError, match="--method uniform cannot use a mixed --vocab-layout"):
        convert("uniform", tmp_path / "out", llm_dir, gen_dir, vocab_layout=layout_prefix + ".vocab.json")
    layout = load_layout(layout_prefix)
    other = VocabLayout.from_dict({k: v for k, v in layout.to_dict().items() if k != "derived"}
                                  | {"image_parent_tokenizer": "huggingface:sha256:0123456789abcdef"})
    other.to_json(tmp_path / "other.vocab.json")
    with pytest.raises(ConvertError, match="built with image_parent_tokenizer huggingface:sha256:0123456789abcdef, "
                                           f"but image model {re.escape(str(gen_dir))}/tokenizer.json"):
        convert("cross", tmp_path / "out", llm_dir, gen_dir, vocab_layout=str(tmp_path / "other.vocab.json"))
    no_output(tmp_path, "out")


@pytest.fixture(scope="module")
def crossed(parents, layout_prefix):
    """The JAM-Cross checkpoint of the two parents through the mixed layout (k = 1)."""
    root, llm_dir, _, gen_dir, _ = parents
    convert("cross", root / "x", llm_dir, gen_dir, cross_every=1, vocab_layout=layout_prefix + ".vocab.json")
    return root / "x"


def test_cross_streams_equal_their_parents_at_step0(single_rank, parents, layout_prefix, crossed):
    from megatron_jam.convert.checkpoint import build_single, load_checkpoint
    from megatron_jam.models.kinds import load_model_config

    root, llm_dir, llm, gen_dir, gen = parents
    layout = load_layout(layout_prefix)
    t, p = layout.text_vocab_size, layout.parent_vocab_size
    record = json.loads((crossed / "conversion.json").read_text())
    assert record["vocab"]["img_ranges"] == [list(r) for r in layout.image_parent_rows]
    assert record["vocab"]["llm_rows_dropped"] == 2 and record["vocab"]["vocab_size"] == layout.vocab_size
    model = build_single(load_model_config(str(crossed)))
    load_checkpoint([model], str(crossed))
    model.eval()
    emb = model.embedding.word_embeddings.weight
    assert torch.equal(emb[:t], llm.get_input_embeddings().weight.detach()[:t])
    parent_rows = torch.from_numpy(image_parent_ids(layout, np.arange(t, p)))
    assert torch.equal(emb[t:p], gen.get_input_embeddings().weight.detach()[parent_rows])
    assert not emb[p:].any(), "rows after the image part are zero (padding)"
    image = layout.format.image_ids(np.arange(6), GRID)  # a whole Emu3 image, then random image-part ids
    image = torch.from_numpy(np.concatenate([image, np.asarray(token_ids(t, p, b=1, s=2 * S - image.size, seed=3))[0]]))
    image = torch.stack([image, image.flip(0)])
    text = token_ids(0, t, s=2 * S, seed=4)
    pos = torch.arange(2 * S).expand(2, 2 * S)
    with torch.no_grad():
        h_llm = model.forward_streams(text, pos)[0].transpose(0, 1)
        h_img = model.forward_streams(image, pos)[1].transpose(0, 1)
        assert rel(h_llm, llm.model(text).last_hidden_state) < 1e-4
        native = torch.from_numpy(image_parent_ids(layout, image.numpy()))
        assert rel(h_img, gen.model.text_model(native).last_hidden_state) < 1e-4


def test_the_generator_reads_the_mixed_layout(single_rank, parents, layout_prefix, crossed, tmp_path, capsys):
    """Text prompts in the LLM's tokenizer; an image forced into Emu3's structure of re-indexed ids."""
    from tool_loader import load_tool

    tool = load_tool("generate_interleaved")
    root, llm_dir, _, gen_dir, _ = parents
    args = ["--load", str(crossed), "--vocab-layout", layout_prefix + ".vocab.json", "--output", str(tmp_path),
            "--max-new-tokens", "24", "--no-progress-bar", "--greedy", "--prompt", "a red square",
            "--start-with-image"]
    assert tool.main(args + ["--tokenizer-model", str(llm_dir)]) == 0
    rec = json.loads((tmp_path / "prompt_0000.json").read_text())
    image = next(s for s in rec["segments"] if s["type"] == "image")
    assert image["complete"] and image["grid"] == list(GRID) and len(image["codes"]) == 6
    assert tool.main(args + ["--tokenizer-model", str(gen_dir)]) == 2, "Emu3's tokenizer is not the layout's"
    assert "text ids but the vocabulary layout has text_vocab_size" in capsys.readouterr().err


def test_different_tokenizers_are_detected_by_identity_or_size(parents, tmp_path):
    """Same kind: the hashes decide; a sentencepiece model against a tokenizer.json: the vocabulary sizes."""
    import io

    import sentencepiece as spm

    from megatron_jam.convert.readers import tokenizer_file, tokenizer_identity
    from megatron_jam.convert.vocab import ParentTokenizer, tokenizers_differ

    root, llm_dir, _, gen_dir, _ = parents
    llm, gen = (ParentTokenizer(who, tokenizer_file(str(d)), tokenizer_identity(str(d)))
                for who, d in (("LLM", llm_dir), ("image model", gen_dir)))
    assert tokenizers_differ(llm, gen) and not tokenizers_differ(llm, llm)
    assert not tokenizers_differ(llm, ParentTokenizer("image model", "", ""))  # unknown: not refused
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(LLM_TEXTS), model_writer=model, vocab_size=40,
                                   model_type="bpe", hard_vocab_limit=False)
    (tmp_path / "sp").mkdir()
    (tmp_path / "sp" / "tokenizer.model").write_bytes(model.getvalue())
    sp = ParentTokenizer("LLM", tokenizer_file(str(tmp_path / "sp")), tokenizer_identity(str(tmp_path / "sp")))
    assert sp.identity.startswith("sentencepiece:") and tokenizers_differ(sp, gen)


def test_an_imported_parent_keeps_its_tokenizer_identity(single_rank, parents, tmp_path):
    """A parent imported first is still recognised: its checkpoint carries a copy of the tokenizer (tokenizer/),
    and without one (an older checkpoint) conversion.json records it; the merge is refused naming the file."""
    root, llm_dir, _, gen_dir, _ = parents
    convert("import", tmp_path / "llm", llm_dir)
    record = json.loads((tmp_path / "llm" / "conversion.json").read_text())
    assert record["text_tokenizer"] == load_text_tokenizer(str(llm_dir)).identity
    for where in ("tokenizer/tokenizer.json", "conversion.json"):
        named = f"LLM {tmp_path}/llm/{where} ({record['text_tokenizer']})"
        with pytest.raises(ConvertError, match=re.escape(named)):
            convert("width", tmp_path / "out", tmp_path / "llm", gen_dir)
        no_output(tmp_path, "out")
        shutil.rmtree(tmp_path / "llm" / "tokenizer", ignore_errors=True)


def test_appended_specials_start_at_zero(single_rank, parents, tmp_path):
    """`--native-specials appended`: the sentinels, <eos_span> and <mask> are new rows after the image part."""
    from megatron_jam.convert.checkpoint import load_state_on_one_rank
    from megatron_jam.models.kinds import load_model_config

    root, llm_dir, _, gen_dir, gen = parents
    assert _preprocess(root, tmp_path / "app", "--native-specials", "appended") == 0
    layout = load_layout(str(tmp_path / "app"))
    convert("cross", tmp_path / "x", llm_dir, gen_dir, vocab_layout=str(tmp_path / "app.vocab.json"))
    emb = load_state_on_one_rank(str(tmp_path / "x"), load_model_config(str(tmp_path / "x")))[
        "embedding.word_embeddings.weight"]
    t, p = layout.text_vocab_size, layout.parent_vocab_size
    assert sorted(layout.appended_specials.values()) == list(range(p, layout.vocab_size)) and layout.vocab_size > p
    assert not emb[p:].any() and emb[t:p].abs().sum(dim=1).all()
    rows = torch.from_numpy(image_parent_ids(layout, np.arange(t, p)))
    assert torch.equal(emb[t:p], gen.get_input_embeddings().weight.detach()[rows])


def test_the_trainer_runs_on_mixed_shards(parents, crossed, tmp_path):
    """Continued pretraining of the mixed JAM-Cross on shards of the mixed layout (CM3, Emu3 images): finite
    text and image losses (`python -m megatron_jam.pretrain`, one process)."""
    import random
    import subprocess

    root, llm_dir, _, gen_dir, _ = parents
    rng = random.Random(0)
    docs = [{"content": [{"text": rng.choice(LLM_TEXTS)},
                         {"image_tokens": [[rng.randrange(64) for _ in range(3)] for _ in range(2)]},
                         {"text": rng.choice(LLM_TEXTS)}]} for _ in range(60)]
    (tmp_path / "docs.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs))
    layout = str(root / "shards" / "mix.vocab.json")
    assert preprocess_interleaved.main(["--input", str(tmp_path / "docs.jsonl"), "--output-prefix",
                                        str(tmp_path / "mix"), "--tokenizer-model", str(llm_dir),
                                        "--vocab-layout", layout, "--no-progress-bar"]) == 0
    cmd = [sys.executable, "-m", "megatron_jam.pretrain", "--load", str(crossed), "--data-path", str(tmp_path / "mix"),
           "--split", "90,10,0", "--seq-length", "48", "--micro-batch-size", "2", "--global-batch-size", "2",
           "--train-iters", "2", "--lr", "1e-3", "--lr-warmup-iters", "1", "--log-interval", "1",
           "--eval-interval", "100", "--metrics-file", str(tmp_path / "metrics.jsonl"),
           "--data-cache-path", str(tmp_path / "cache")]
    # a clean launch environment: in-process tools of earlier tests may have set RANK / MASTER_PORT (29500)
    # here while this process still serves that port, and the child would rendezvous with it
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                                                             "MASTER_PORT", "LOCAL_WORLD_SIZE")}
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300,
                          env=env | {"OMP_NUM_THREADS": "1", "MASTER_PORT": str(port)})
    assert done.returncode == 0, done.stderr[-2000:]
    steps = [json.loads(x) for x in open(tmp_path / "metrics.jsonl") if "valid_set" not in x]
    assert len(steps) == 2 and all(np.isfinite([s["text_loss"], s["image_loss"]]).all() for s in steps)
