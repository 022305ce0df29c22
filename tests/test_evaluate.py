"""tools/evaluate.py: per-modality perplexity equals an independent computation with transformers
(per document, strided windows), at TP=1 and TP=2; plain text datasets count as text; the CLI writes JSON.
The datasets and the independent perplexity are tests/eval_helpers.py's."""

import json

import pytest

from eval_helpers import eval_docs, expected_perplexity, llama_eval_world, run_evaluate, write_documents
from tool_loader import load_tool


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    docs = eval_docs()
    root, model = llama_eval_world(tmp_path_factory, "eval", 7, docs)
    write_documents(str(root / "plain"), docs, multimodal=False)
    return root, model, docs


def _tool():
    return load_tool("evaluate")


def test_perplexity_matches_transformers(single_rank, setup):
    root, model, docs = setup
    got = run_evaluate(["--load", str(root / "ckpt"), "--data-path", str(root / "mm"), "--micro-batch-size", "2"])
    want = expected_perplexity(model, docs)
    for k in ("all", "text", "image"):
        assert got["ppl"][k] == pytest.approx(want[k], rel=1e-5), k
    n = sum(len(ids) for d in docs for _, ids in d)
    assert got["tokens"]["all"] == n - len(docs)  # every token once but each document's first
    assert got["tokens"]["image"] == 15  # the second document's leading image token is its first: no target


def _eval_tp2(root):
    return run_evaluate(["--load", str(root / "ckpt"), "--data-path", str(root / "mm"),
                         "--tensor-model-parallel-size", "2"])["ppl"]


def test_tp2_gives_the_same_perplexity(pool2, setup):
    root, model, docs = setup
    want = expected_perplexity(model, docs)
    for ppl in pool2.run(_eval_tp2, root):
        for k in ("all", "text", "image"):
            assert ppl[k] == pytest.approx(want[k], rel=1e-5), k


def test_plain_text_dataset_is_all_text(single_rank, setup):
    root, _, _ = setup
    got = run_evaluate(["--load", str(root / "ckpt"), "--data-path", str(root / "plain")])
    mm = run_evaluate(["--load", str(root / "ckpt"), "--data-path", str(root / "mm")])
    assert not got["multimodal"] and got["tokens"]["image"] == 0 and got["ppl"]["image"] is None
    assert got["ppl"]["all"] == pytest.approx(mm["ppl"]["all"], rel=1e-6)
    assert got["ppl"]["text"] == pytest.approx(got["ppl"]["all"], rel=1e-12)


def test_cli_writes_json_and_reports_errors(single_rank, setup, tmp_path, capsys):
    root, _, _ = setup
    tool = _tool()
    out = tmp_path / "res" / "ppl.json"
    assert tool.main(["--load", str(root / "ckpt"), "--data-path", str(root / "mm"), "--output", str(out)]) == 0
    assert json.loads(out.read_text())["ppl"]["image"] > 1
    assert tool.main(["--load", str(root / "ckpt"), "--data-path", str(root / "mm"),
                      "--tensor-model-parallel-size", "3"]) == 2
    assert "not divisible by tensor-model-parallel-size=3" in capsys.readouterr().err
