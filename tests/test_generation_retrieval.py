"""Retrieval-augmented generation (paper section 3.1): tools/generate_interleaved.py and
tools/evaluate_generation.py with --retrieval-index / --retrieval-k retrieve bank documents with the
prompt's CLIP embedding and prepend exactly their tokens; the JSON lists them, the HTML shows them apart
from the prompt and the output; bad flags fail with one line before any model is built.

Reuses the tiny JAM-Cross checkpoint of tests/test_generate_tool.py and the tiny random CLIP of
tests/test_retrieval.py (the `gentool` and `tiny_clip` fixtures of tests/conftest.py); the bank is
written straight as shards in the checkpoint's layout.
"""

import json
import os

import numpy as np
import pytest

from tool_loader import load_tool

PROMPT = "ka lo"  # 6 spm tokens: with two 24-token bank documents and 4 new tokens it fits 64
WORDS = ["ka", "lo", "mi", "ter", "san", "bu", "ra", "ne"]


@pytest.fixture(scope="module")
def bank_index(gentool, tiny_clip, tmp_path_factory):
    """(index path, bank prefix): 10 short documents with an image each, except document 3: the prompt
    itself, text only (a near duplicate, score 1: skipped)."""
    import sentencepiece as spm
    from PIL import Image

    from jam_data_helpers import write_dataset
    from megatron_jam.data.documents import IMAGE, TEXT, build_sequences

    root, layout = gentool
    sp = spm.SentencePieceProcessor(model_file=str(root / "spm.model"))
    folder = tmp_path_factory.mktemp("ragbank")
    rng = np.random.default_rng(0)
    records, docs = [], []
    for i in range(10):
        text = PROMPT if i == 3 else " ".join(rng.choice(WORDS, 2))
        content, segments = [{"text": text}], [(TEXT, np.array(sp.encode(text)))]
        if i != 3:
            Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(folder / f"{i}.png")
            content.append({"image": f"{i}.png"})
            segments.append((IMAGE, layout.image_offset + rng.integers(0, layout.codebook_size,
                                                                       layout.tokens_per_image)))
        records.append({"content": content})
        docs.append(build_sequences(segments, layout))
    (folder / "docs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    prefix = write_dataset(folder / "bank", docs, layout=layout)
    (folder / "bank.stats.json").write_text(json.dumps({"inputs": [str(folder / "docs.jsonl")]}))
    index = str(folder / "bank.faiss")
    assert load_tool("build_retrieval_index").main(["--data-path", prefix, "--clip-model", tiny_clip, "--output",
                                                    index, "--no-progress-bar"]) == 0
    return index, prefix


def expected_neighbours(index, clip, text, k=2):
    """A direct MipsIndex search + select_neighbors on the prompt's CLIP embedding (no dropout)."""
    from megatron_jam.data.clip_embed import ClipEmbedder
    from megatron_jam.data.retrieval import MipsIndex, select_neighbors

    mips = MipsIndex.load(index)
    scores, ids = mips.search(ClipEmbedder(clip).embed([(text, [])]), mips.size)
    kept = select_neighbors(scores, ids, k, max_score=0.9)[0]
    return [int(i) for i in kept if i >= 0], dict(zip(ids[0].tolist(), scores[0].tolist()))


def _gen_args(root, out, *extra):
    return ["--load", str(root / "ckpt"), "--vocab-layout", str(root / "layout.json"), "--tokenizer-model",
            str(root / "spm.model"), "--output", str(out), "--no-progress-bar", "--greedy", *extra]


def test_generation_prepends_exactly_the_retrieved_documents(single_rank, gentool, tiny_clip, bank_index,
                                                             tmp_path, capsys):
    import sentencepiece as spm

    from megatron_jam.data.cm3_dataset import DocumentReader

    root, layout = gentool
    index, prefix = bank_index
    want, scores = expected_neighbours(index, tiny_clip, PROMPT)
    assert len(want) == 2 and 3 not in want  # the prompt's own copy is a near duplicate
    rc = load_tool("generate_interleaved").main(_gen_args(
        root, tmp_path, "--prompt", PROMPT, "--image-tokenizer", str(root / "janus"), "--max-new-tokens", "4",
        "--retrieval-index", index, "--retrieval-k", "2"))
    assert rc == 0
    assert json.loads(capsys.readouterr().out)["documents"][0]["retrieved"] == want
    rec = json.loads((tmp_path / "prompt_0000.json").read_text())
    assert rec["retrieved"]["ids"] == want and rec["retrieved"]["scores"] == pytest.approx([scores[i] for i in want])
    bank = DocumentReader(prefix, layout)
    prompt_ids = spm.SentencePieceProcessor(model_file=str(root / "spm.model")).encode(PROMPT)
    assert rec["prompt_ids"] == prompt_ids
    assert rec["context_ids"] == [t for i in want for t in bank.tokens(i).tolist()] + prompt_ids
    assert rec["retrieval"]["k"] == 2 and rec["retrieval"]["clip_model"] == os.path.abspath(tiny_clip)
    # the page shows the retrieved documents, apart and before the prompt, rendered like the output
    page = (tmp_path / "prompt_0000.html").read_text()
    shown = page.index("Retrieved documents: what the model saw")
    assert shown < page.index("<b>Prompt:</b>") < page.index("Output")
    for i, doc in zip(want, rec["retrieved_documents"]):
        assert doc["id"] == i and f"bank document {i}," in page
        for seg in doc["segments"]:
            if seg["type"] == "image":
                assert seg["rendering"] == "decoded" and (tmp_path / seg["file"]).exists()
                assert f"src='{seg['file']}'" in page[shown:page.index("<b>Prompt:</b>")]
            elif seg["type"] == "text":
                assert seg["text"] in page
    assert any(s["type"] == "image" for d in rec["retrieved_documents"] for s in d["segments"])
    # the budget: generation keeps --max-new-tokens; a document that does not fit whole is left out
    out = tmp_path / "budget"
    assert load_tool("generate_interleaved").main(_gen_args(
        root, out, "--prompt", PROMPT, "--max-new-tokens", "20", "--retrieval-index", index, "--retrieval-k", "2")) == 0
    rec = json.loads((out / "prompt_0000.json").read_text())
    assert 64 - len(prompt_ids) - 20 < 2 * 24 and rec["retrieved"]["ids"] == want[:1]
    assert [d["id"] for d in rec["retrieved"]["skipped_no_room"]] == want[1:]
    assert rec["context_ids"] == bank.tokens(want[0]).tolist() + prompt_ids


def _fails_early(capsys, monkeypatch, argv, message, tool="generate_interleaved"):
    import megatron_jam.inference.loading as loading

    monkeypatch.setattr(loading, "load_model", lambda *a, **k: pytest.fail("a model was built"))
    assert load_tool(tool).main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and "\n" not in err


def test_retrieval_flags_fail_with_one_line_before_any_model(single_rank, gentool, bank_index, tmp_path,
                                                             capsys, monkeypatch):
    root, _ = gentool
    index, _ = bank_index
    _fails_early(capsys, monkeypatch, _gen_args(root, tmp_path / "a", "--prompt", PROMPT, "--retrieval-k", "2"),
                 "--retrieval-k 2 needs --retrieval-index")
    meta = json.loads(open(index + ".bank.json").read())
    for suffix in ("", ".json"):
        (tmp_path / f"moved.faiss{suffix}").write_bytes(open(index + suffix, "rb").read())
    (tmp_path / "moved.faiss.bank.json").write_text(json.dumps(meta | {"bank": str(tmp_path / "gone")}))
    _fails_early(capsys, monkeypatch, _gen_args(root, tmp_path / "b", "--prompt", PROMPT, "--retrieval-index",
                                                str(tmp_path / "moved.faiss")), "bank dataset")
    _fails_early(capsys, monkeypatch, _eval_args(root, tmp_path, "--retrieval-k", "2"),
                 "--retrieval-k 2 needs --retrieval-index", tool="evaluate_generation")


def _eval_args(root, tmp_path, *extra):
    items = [{"name": "a", "prompt": PROMPT, "colour": "red", "shape": "circle"},
             {"name": "b", "prompt": "san bu ra", "colour": "blue", "shape": "square"}]
    (tmp_path / "p.jsonl").write_text("".join(json.dumps(i) + "\n" for i in items))
    return ["--load", str(root / "ckpt"), "--vocab-layout", str(root / "layout.json"), "--tokenizer-model",
            str(root / "spm.model"), "--image-tokenizer", str(root / "janus"), "--prompts-file",
            str(tmp_path / "p.jsonl"), "--cfg-scale", "1", "--samples-per-prompt", "1",
            "--output", str(tmp_path / "r.json"), "--no-progress-bar", *extra]


def test_prompt_following_accepts_the_retrieval_flags(single_rank, gentool, tiny_clip, bank_index,
                                                      tmp_path):
    import sentencepiece as spm

    root, _ = gentool
    index, _ = bank_index
    sp = spm.SentencePieceProcessor(model_file=str(root / "spm.model"))
    assert load_tool("evaluate_generation").main(_eval_args(root, tmp_path, "--retrieval-index", index,
                                                            "--retrieval-k", "2")) == 0
    rec = json.loads((tmp_path / "r.json").read_text())
    assert rec["retrieval"]["k"] == 2 and len(rec["rows"]) == 2
    for row in rec["rows"]:
        want, _ = expected_neighbours(index, tiny_clip, row["prompt"])
        got = row["retrieved"]
        assert got["ids"] and got["ids"] + [d["id"] for d in got["skipped_no_room"]] == want
        assert sum(got["tokens"]) <= 64 - 17 - len(sp.encode(row["prompt"]))  # <break> + 16 codes stay free


# ------------------------------------------------------------------ the trainer's rule (paper recipes)
def test_trainer_requires_neighbours_for_image_text_prefixes(tmp_path):
    """--retrieval-k: an image-text prefix without neighbours stops the run (one line naming it); text-only
    and instruction prefixes, and those passed to --retrieval-optional, are trained packed."""
    from jam_data_helpers import image_text_corpus, text_only_corpus, write_dataset
    from megatron_jam.data.instruct import loss_mask_path
    from megatron_jam.data.retrieval import save_neighbors
    from megatron_jam.models.config import ConfigError
    from megatron_jam.training.arguments import build_parser
    from megatron_jam.training.data import _check_neighbors

    rng = np.random.default_rng(0)
    text = write_dataset(tmp_path / "text", text_only_corpus(rng, 4))
    imgtext = write_dataset(tmp_path / "imgtext", image_text_corpus(rng, 4))
    instruct = write_dataset(tmp_path / "instruct", image_text_corpus(rng, 4))
    np.save(loss_mask_path(instruct), np.ones(1, dtype=np.uint8))

    def check(*flags):
        _check_neighbors(build_parser().parse_args(["--data-path", text, imgtext, instruct, *flags]),
                         [text, imgtext, instruct])

    check()  # retrieval off: nothing required
    with pytest.raises(ConfigError, match=f"image-text prefix {imgtext} has no {imgtext}.neighbors.npy") as e:
        check("--retrieval-k", "3")
    assert "\n" not in str(e.value) and "RETRIEVAL=0" in str(e.value)
    check("--retrieval-k", "3", "--retrieval-optional", imgtext)
    save_neighbors(imgtext, np.zeros((4, 3), dtype=np.int64), {"bank": imgtext})
    check("--retrieval-k", "3")


def test_paper_recipes_retrieve_unless_switched_off():
    import subprocess

    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    show = 'source examples/launch.sh; echo "${PAPER_PRETRAIN[*]}"; echo "${PAPER_INSTRUCT[*]}"'
    for value, want in (("1", True), ("0", False)):
        env = dict(os.environ, JAM_SKIP_INSTALL="1", RETRIEVAL=value, PATH="/usr/bin:/bin")
        lines = subprocess.run(["bash", "-c", show], cwd=repo, env=env, capture_output=True, text=True,
                               check=True).stdout.splitlines()
        assert [line.endswith("--retrieval-k 3") for line in lines] == [want, want]
