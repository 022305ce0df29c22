"""tools/evaluate.py: per-modality perplexity equals an independent computation with transformers
(per document, strided windows), at TP=1 and TP=2; plain text datasets count as text; the CLI writes JSON."""

import json
import math

import numpy as np
import pytest
import torch

from test_convert import _hf_logits, convert, make_llama
from tool_loader import load_tool

SEQ = 8


def _write_dataset(prefix, docs, multimodal=True):
    """docs: list of documents, each a list of (mode, ids)."""
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    b = IndexedDatasetBuilder(prefix + ".bin", dtype=np.uint16, multimodal=multimodal)
    for doc in docs:
        for mode, ids in doc:
            if multimodal:
                b.add_item(torch.tensor(ids, dtype=torch.int64), mode)
            else:
                b.add_item(torch.tensor(ids, dtype=torch.int64))
        b.end_document()
    b.finalize(prefix + ".idx")


def _docs(seed=0):
    rng = np.random.default_rng(seed)
    text = lambda n: (0, rng.integers(0, 60, n).tolist())  # noqa: E731
    image = lambda n: (1, rng.integers(60, 100, n).tolist())  # noqa: E731
    return [[text(7), image(8), text(3)], [text(10)], [image(8), text(5)]]


def _expected(model, docs, seq=SEQ, stride=None):
    """Independent: Hugging Face's strided perplexity recipe document by document (windows of seq + 1
    tokens starting every `stride`, default seq // 2; each window's labels are -100 but its last
    end - prev_end tokens), HF log-softmax, sums per modality of the label."""
    stride = stride or max(1, seq // 2)
    sums = {"text": [0.0, 0], "image": [0.0, 0]}
    for d in docs:
        toks = [t for _, ids in d for t in ids]
        img = [m == 1 for m, ids in d for _ in ids]
        prev_end = 0
        for begin in range(0, len(toks), stride):
            end = min(begin + seq + 1, len(toks))
            trg_len = end - prev_end
            w = toks[begin:end]
            if len(w) > 1:
                logp = torch.log_softmax(_hf_logits(model, torch.tensor([w[:-1]]))[0].double(), -1)
                for j in range(max(1, len(w) - trg_len), len(w)):  # label j, predicted at j - 1
                    kind = "image" if img[begin + j] else "text"
                    sums[kind][0] -= logp[j - 1, w[j]].item()
                    sums[kind][1] += 1
            prev_end = end
            if end == len(toks):
                break
    tot = (sums["text"][0] + sums["image"][0], sums["text"][1] + sums["image"][1])
    return {"all": math.exp(tot[0] / tot[1]), **{k: math.exp(v[0] / v[1]) for k, v in sums.items() if v[1]}}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    import megatron_jam  # noqa: F401
    from megatron_jam.convert.checkpoint import ensure_single_rank

    ensure_single_rank()
    root = tmp_path_factory.mktemp("eval")
    model = make_llama(root / "hf", seed=7)
    convert("import", root / "ckpt", root / "hf", seq_length=SEQ)
    docs = _docs()
    _write_dataset(str(root / "mm"), docs)
    _write_dataset(str(root / "plain"), docs, multimodal=False)
    return root, model, docs


def _tool():
    return load_tool("evaluate")


def _run(argv):
    tool = _tool()
    return tool.evaluate(tool.build_parser().parse_args(argv))


def test_perplexity_matches_transformers(single_rank, setup):
    root, model, docs = setup
    got = _run(["--load", str(root / "ckpt"), "--data-path", str(root / "mm"), "--micro-batch-size", "2"])
    want = _expected(model, docs)
    for k in ("all", "text", "image"):
        assert got["ppl"][k] == pytest.approx(want[k], rel=1e-5), k
    n = sum(len(ids) for d in docs for _, ids in d)
    assert got["tokens"]["all"] == n - len(docs)  # every token once but each document's first
    assert got["tokens"]["image"] == 15  # the second document's leading image token is its first: no target


def _eval_tp2(root):
    return _run(["--load", str(root / "ckpt"), "--data-path", str(root / "mm"),
                 "--tensor-model-parallel-size", "2"])["ppl"]


def test_tp2_gives_the_same_perplexity(pool2, setup):
    root, model, docs = setup
    want = _expected(model, docs)
    for ppl in pool2.run(_eval_tp2, root):
        for k in ("all", "text", "image"):
            assert ppl[k] == pytest.approx(want[k], rel=1e-5), k


def test_plain_text_dataset_is_all_text(single_rank, setup):
    root, _, _ = setup
    got = _run(["--load", str(root / "ckpt"), "--data-path", str(root / "plain")])
    mm = _run(["--load", str(root / "ckpt"), "--data-path", str(root / "mm")])
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
