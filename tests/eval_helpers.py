"""Tiny evaluation datasets and an independent perplexity, shared by the tools/evaluate.py tests and the
conversion tests that check a converted model's perplexity against transformers'.

Documents are lists of (mode, ids) items (mode 0 text, 1 image) written straight through Megatron's
`IndexedDatasetBuilder`; the expected perplexity is Hugging Face's strided recipe computed with the
transformers model itself, independent of tools/evaluate.py.
"""

import math

import numpy as np
import torch

from parent_helpers import convert, hf_logits, make_llama
from tool_loader import load_tool

SEQ = 8


def llama_eval_world(tmp_path_factory, name, seed, docs):
    """A tiny Llama (`root/hf`), its import at seq `SEQ` (`root/ckpt`) and `docs` written to `root/mm`:
    (root, transformers model)."""
    import megatron_jam  # noqa: F401
    from megatron_jam.convert.checkpoint import ensure_single_rank

    ensure_single_rank()
    root = tmp_path_factory.mktemp(name)
    model = make_llama(root / "hf", seed=seed)
    convert("import", root / "ckpt", root / "hf", seq_length=SEQ)
    write_documents(str(root / "mm"), docs)
    return root, model


def write_documents(prefix, docs, multimodal=True):
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


def eval_docs(seed=0):
    """Three random documents over 100 ids (text 0..59, image 60..99)."""
    rng = np.random.default_rng(seed)
    text = lambda n: (0, rng.integers(0, 60, n).tolist())  # noqa: E731
    image = lambda n: (1, rng.integers(60, 100, n).tolist())  # noqa: E731
    return [[text(7), image(8), text(3)], [text(10)], [image(8), text(5)]]


def expected_perplexity(model, docs, seq=SEQ, stride=None):
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
                logp = torch.log_softmax(hf_logits(model, torch.tensor([w[:-1]]))[0].double(), -1)
                for j in range(max(1, len(w) - trg_len), len(w)):  # label j, predicted at j - 1
                    kind = "image" if img[begin + j] else "text"
                    sums[kind][0] -= logp[j - 1, w[j]].item()
                    sums[kind][1] += 1
            prev_end = end
            if end == len(toks):
                break
    tot = (sums["text"][0] + sums["image"][0], sums["text"][1] + sums["image"][1])
    return {"all": math.exp(tot[0] / tot[1]), **{k: math.exp(v[0] / v[1]) for k, v in sums.items() if v[1]}}


def run_evaluate(argv):
    """tools/evaluate.py's result dict for command line `argv`, in-process."""
    tool = load_tool("evaluate")
    return tool.evaluate(tool.build_parser().parse_args(argv))
