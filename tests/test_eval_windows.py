"""Evaluation per document (issue 18, item 6) and the trainer's tiny-run defaults (item 7).

Each document is scored on its own in Hugging Face's strided windows: every target once, never a window
across two documents; tools/evaluate.py equals transformers' per-document perplexity at another stride
and TP=1 / TP=2; the trainer's default validation (no CM3) equals tools/evaluate.py on the same set; the
trainer's `--help` shows every default and a run on the tiny-run defaults says so."""

import argparse
import json
import os

import numpy as np
import pytest

from eval_helpers import eval_docs, expected_perplexity, llama_eval_world, write_documents
from jam_data_helpers import image_text_corpus, text_only_corpus, write_dataset
from tool_loader import load_tool

SEQ, STRIDE = 8, 3
PARENT = os.path.join(os.path.dirname(__file__), "..", "examples", "configs", "parent_llm_tiny.json")


@pytest.mark.parametrize("n,seq,stride", [(2, 8, 4), (9, 8, 4), (10, 8, 4), (40, 8, 3), (40, 8, 8), (17, 4, 1)])
def test_every_target_is_scored_once_with_the_most_context(n, seq, stride):
    from megatron_jam.evaluation import document_spans

    spans = list(document_spans(n, seq, stride))
    scored = [t for _, end, first in spans for t in range(first, end)]
    assert scored == list(range(1, n))  # each target but the first token once, in order
    for begin, end, first in spans:
        assert 0 < end - begin <= seq + 1 and begin < first
        assert begin == 0 or first - begin >= seq + 1 - stride  # at least seq - stride tokens of context


def test_windows_never_cross_documents(tmp_path):
    from megatron_jam.evaluation import open_dataset, windows

    docs = [[(0, [10 * k + 1] * n)] for k, n in enumerate([1, 5, 12, 9, 30])]  # document k: ids 10k+1
    write_documents(str(tmp_path / "d"), docs)
    ds, has_modes = open_dataset(str(tmp_path / "d"))
    wins = list(windows(ds, has_modes, SEQ, stride=STRIDE))
    per_doc = {}
    for tok, _, scored in wins:
        ids = set(tok[tok > 0].tolist())
        assert len(ids) == 1 and tok.size == SEQ + 1 and not scored[0]  # one document, padded with 0
        doc = ids.pop()
        per_doc[doc] = per_doc.get(doc, 0) + int(scored.sum())
    assert per_doc == {10 * k + 1: n - 1 for k, n in enumerate([1, 5, 12, 9, 30]) if n > 1}
    assert len(list(windows(ds, has_modes, SEQ, limit=3, stride=STRIDE))) == 3


def test_batches_are_cut_to_their_longest_window():
    from megatron_jam.evaluation import _batches

    def win(n, span=41):  # a window of n tokens (ids 0..n-1, then padding), targets 1..n-1
        pos = np.arange(span)
        return pos * (pos < n), np.zeros(span, bool), (pos >= 1) & (pos < n)

    wins = [win(5), win(30), win(20), (win(5)[0], win(5)[1], np.zeros(41, bool))]  # the last: padding
    assert [b["tokens"].shape for b in _batches(wins, 2, multiple=16)] == [(2, 32), (2, 16)]  # 30, 20 | 5, pad
    assert [b["tokens"].shape for b in _batches(wins, 2)] == [(2, 40), (2, 40)]
    b = _batches(wins, 2, multiple=16)[0]
    assert int(b["valid"].sum()) == 29 + 19 and b["labels"][0, 28] == 29


def test_stride_out_of_range_is_one_line():
    from megatron_jam.evaluation import default_stride

    assert default_stride(8) == 4 and default_stride(1) == 1 and default_stride(8, 8) == 8
    for bad in (0, 9):
        with pytest.raises(ValueError, match=f"--eval-stride {bad} must be between 1 and --seq-length 8"):
            default_stride(8, bad)


@pytest.fixture(scope="module")
def hf_world(tmp_path_factory):
    docs = eval_docs(seed=1) + [[(0, list(range(1, 40)))]]  # one document of 4 windows and more
    root, model = llama_eval_world(tmp_path_factory, "evalwin", 3, docs)
    return root, model, docs


def _evaluate(root, *extra):
    tool = load_tool("evaluate")
    return tool.evaluate(tool.build_parser().parse_args(
        ["--load", str(root / "ckpt"), "--data-path", str(root / "mm"), "--eval-stride", str(STRIDE), *extra]))


def _evaluate_tp2(root, *extra):
    return _evaluate(root, "--tensor-model-parallel-size", "2", "--micro-batch-size", "3", *extra)["ppl"]


@pytest.mark.parametrize("seq", [SEQ, 40], ids=["window 8", "window 40: batches cut to their longest window"])
def test_per_document_perplexity_equals_transformers_at_tp1_and_tp2(single_rank, pool2, hf_world, seq):
    root, model, docs = hf_world
    want = expected_perplexity(model, docs, seq=seq, stride=STRIDE)
    got = _evaluate(root, "--micro-batch-size", "2", "--seq-length", str(seq))
    assert got["stride"] == STRIDE and got["tokens"]["all"] == sum(len(i) for d in docs for _, i in d) - len(docs)
    for ppl in [got["ppl"], *pool2.run(_evaluate_tp2, root, "--seq-length", str(seq))]:
        for k in ("all", "text", "image"):
            assert ppl[k] == pytest.approx(want[k], rel=1e-5), k


def test_training_validation_equals_evaluate(single_rank, tmp_path):
    """Default validation (per document, no CM3) of a small run = tools/evaluate.py on its checkpoint."""
    from megatron_jam.training.loop import main

    rng = np.random.default_rng(0)
    text = write_dataset(tmp_path / "text", text_only_corpus(rng, 40))
    coco = write_dataset(tmp_path / "coco", image_text_corpus(rng, 12))
    save = tmp_path / "run"
    main(["--data-path", text, "--split", "80,20,0", "--seq-length", "32", "--micro-batch-size", "2",
          "--global-batch-size", "2", "--train-iters", "2", "--lr", "3e-3", "--lr-warmup-iters", "1",
          "--eval-interval", "2", "--eval-iters", "3", "--valid-data-path", f"image={coco}", "--save", str(save),
          "--data-cache-path", str(tmp_path / "cache")])
    records = {r["valid_set"]: r for r in map(json.loads, open(save / "metrics.jsonl")) if "valid_set" in r}
    assert set(records) == {"valid", "image"} and np.isfinite(records["valid"]["valid_lm_loss"])
    tool = load_tool("evaluate")
    got = tool.evaluate(tool.build_parser().parse_args(["--load", str(save), "--data-path", coco, "--seq-length",
                                                        "32", "--max-windows", "6"]))  # eval-iters x batch
    rec = records["image"]
    assert got["windows"] == 6
    for k, key in (("all", "valid_lm_loss"), ("text", "valid_text_loss"), ("image", "valid_image_loss")):
        assert rec[key] == pytest.approx(got["nll"][k], rel=1e-5), k


def test_help_shows_every_default():
    from megatron_jam.training.arguments import build_parser

    for a in build_parser()._actions:
        off = a.default is None or a.default is False or a.default == argparse.SUPPRESS
        if a.option_strings and not off:
            assert "default" in a.help, a.option_strings


def test_tiny_defaults_are_never_silent(monkeypatch):
    from megatron_jam.training import arguments

    lines = []
    monkeypatch.setattr(arguments, "log_rank0", lambda _, fmt, *a: lines.append(fmt % a))
    args = arguments.build_parser().parse_args([])
    arguments.validate_args(args)
    assert args.lr == 3e-4 and args.lr_warmup_iters == 2 and args.train_iters == 20
    assert any("tiny-run defaults in use: --lr 0.0003, --lr-warmup-iters 2, --train-iters 20" in x for x in lines)
    lines.clear()
    arguments.validate_args(arguments.build_parser().parse_args(["--lr", "1e-5", "--lr-warmup-iters", "3",
                                                                 "--train-iters", "9"]))
    assert not any("tiny-run" in x for x in lines)


def _train_pp2_vpp(argv):
    from megatron_jam.training.loop import main

    main(argv)


def test_validation_under_an_interleaved_pipeline(single_rank, pool2, tmp_path):
    """PP=2 with virtual stages: 3 windows are padded to whole groups of PP micro-batches (Megatron-Core's
    interleaved schedule refuses others), and the loss still equals tools/evaluate.py's."""
    rng = np.random.default_rng(1)
    text = write_dataset(tmp_path / "text", text_only_corpus(rng, 40))
    short = write_dataset(tmp_path / "short", text_only_corpus(rng, 3, lo=10, hi=30))  # 3 documents, 1 window each
    save = tmp_path / "run"
    pool2.run(_train_pp2_vpp, [
        "--data-path", text, "--split", "80,20,0", "--seq-length", "32", "--micro-batch-size", "1",
        "--global-batch-size", "2", "--train-iters", "1", "--lr", "3e-3", "--lr-warmup-iters", "0",
        "--eval-interval", "1", "--eval-iters", "4", "--valid-data-path", f"short={short}", "--save", str(save),
        "--model-config", PARENT, "--num-layers", "4", "--hidden-size", "32",  # a single stack: 4 stages of 1 layer
        "--pipeline-model-parallel-size", "2", "--num-layers-per-virtual-pipeline-stage", "1",
        "--data-cache-path", str(tmp_path / "cache")])
    rec = next(r for r in map(json.loads, open(save / "metrics.jsonl")) if r.get("valid_set") == "short")
    tool = load_tool("evaluate")
    got = tool.evaluate(tool.build_parser().parse_args(["--load", str(save), "--data-path", short, "--seq-length",
                                                        "32"]))
    assert got["windows"] == 3 and rec["valid_lm_loss"] == pytest.approx(got["nll"]["all"], rel=1e-5)
