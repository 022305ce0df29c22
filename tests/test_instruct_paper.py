"""Instruction tuning as the paper did it (issue 18 item 3; paper sections 2.2, 3.1, 3.1.1).

The instruct recipe (examples/launch.sh PAPER_INSTRUCT) trains with CM3 for epochs; an epoch run names
the checkpoint of the lowest *average validation perplexity* (a scripted validation curve on which the
lowest average loss would pick another one); instruction samples are whole documents, so none starts
inside a response (shards written by tools/preprocess_instruct.py, every sample read); the wikiHow
curation options filter, cap, rewrite and count.
"""

import io
import json
import math
import os
import random
import subprocess

import numpy as np
import pytest

from jam_data_helpers import LAYOUT, write_dataset
from megatron_jam.data.documents import IMAGE, TEXT
from megatron_jam.data.instruct import build_instruct_sequences
from tool_loader import load_tool

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SEQ = 64
WORDS = "how make tea cup water boil pour steep minutes hot leaf pot serve warm".split()


# ---------------------------------------------------------------- the recipe
def _recipe(**env) -> list:
    show = 'source examples/launch.sh; printf "%s\\n" "${PAPER_INSTRUCT[@]}"'
    env = dict(os.environ, JAM_SKIP_INSTALL="1", PATH="/usr/bin:/bin", **env)
    out = subprocess.run(["bash", "-c", show], cwd=REPO, env=env, capture_output=True, text=True, check=True)
    return out.stdout.splitlines()


def test_instruct_recipe_runs_cm3_for_epochs():
    from megatron_jam.training.arguments import build_parser
    from megatron_jam.training.data import _cm3, _sample_options

    argv = _recipe()
    assert "--no-cm3" not in argv
    args = build_parser().parse_args(argv + ["--data-path", "x"])
    assert _cm3(args) is not None and _cm3(args).enabled  # the objective of every experiment of the paper
    assert args.train_epochs == 15 and args.train_iters is None and args.finetune
    assert _sample_options(args) == {"whole_documents": "auto", "prompt_loss": False}
    assert build_parser().parse_args(_recipe(EPOCHS="9") + ["--data-path", "x"]).train_epochs == 9


# ---------------------------------------------------------------- best checkpoint by average validation PPL
def _instruct_docs(rng, n):
    docs = []
    for _ in range(n):
        image = LAYOUT.image_offset + rng.integers(0, LAYOUT.codebook_size, LAYOUT.tokens_per_image)
        segments = [(False, TEXT, rng.integers(0, 100, 8)), (True, TEXT, rng.integers(100, 200, 10)),
                    (True, IMAGE, image)]
        docs.append(build_instruct_sequences(segments, LAYOUT))
    return docs


def _write_instruct(prefix, docs):
    return write_dataset(prefix, [(s, m) for s, m, _ in docs], loss_flags=[f for d in docs for f in d[2]])


# Per epoch, the losses of the named sets a and b, and of the blend's own split (ignored: named sets exist).
# Epoch 2 has the lowest mean perplexity; epoch 4 the lowest mean loss; epoch 3 the lowest "valid".
CURVE = [(1.0, 3.0, 2.0), (2.1, 2.1, 2.0), (2.5, 2.5, 0.1), (0.5, 3.2, 2.0)]


def test_epochs_validate_and_name_the_lowest_average_perplexity(single_rank, tmp_path, monkeypatch):
    from megatron_jam.training import loop
    from megatron_jam.training.best_checkpoint import BEST_RECORD, BEST_TRACKER, read_best

    prefix = _write_instruct(tmp_path / "sft", _instruct_docs(np.random.default_rng(0), 16))
    calls = []

    def scripted(chunks, args, valid_sets, iteration, writer):
        a, b, own = CURVE[len(calls)]
        calls.append(iteration)
        assert set(valid_sets) == {"valid", "a", "b"}
        return {name: {"lm_loss": loss, "text_loss": loss, "image_loss": loss}
                for name, loss in (("valid", own), ("a", a), ("b", b))}

    monkeypatch.setattr(loop, "_evaluate", scripted)
    save = tmp_path / "run"
    history = loop.main(["--data-path", prefix, "--split", "75,25,0", "--seq-length", str(SEQ),
                         "--micro-batch-size", "2", "--global-batch-size", "4", "--train-epochs", "4",
                         "--lr", "1e-3", "--lr-warmup-iters", "1", "--eval-iters", "1",
                         "--valid-data-path", f"a={prefix}", f"b={prefix}", "--save", str(save),
                         "--data-cache-path", str(tmp_path / "cache")])
    # 16 documents, 75% for training = 12 samples per epoch = 3 iterations of 4; a validation after each epoch
    assert len(history) == 12 and calls == [3, 6, 9, 12]
    means = [(math.exp(a) + math.exp(b)) / 2 for a, b, _ in CURVE]
    assert int(np.argmin(means)) == 1 and int(np.argmin([a + b for a, b, _ in CURVE])) == 3
    assert read_best(str(save)) == 6 and (save / BEST_TRACKER).read_text() == "6"
    assert os.readlink(save / "best") == "iter_0000006" and (save / "best" / "metadata.json").exists()
    assert (save / "latest_checkpointed_iteration.txt").read_text() == "12"
    assert sorted(d for d in os.listdir(save) if d.startswith("iter_")) == [f"iter_{i:07d}" for i in (3, 6, 9, 12)]
    record = json.loads((save / BEST_RECORD).read_text())
    assert record["best"]["iteration"] == 6 and record["best"]["epoch"] == 2
    assert [v["epoch"] for v in record["validations"]] == [1, 2, 3, 4]
    assert record["best"]["average_ppl"] == pytest.approx(means[1])


def test_train_epochs_excludes_train_iters(tmp_path):
    from megatron_jam.models.config import ConfigError
    from megatron_jam.training.arguments import build_parser, validate_args

    prefix = _write_instruct(tmp_path / "sft", _instruct_docs(np.random.default_rng(1), 4))
    args = build_parser().parse_args(["--data-path", prefix, "--train-epochs", "2", "--train-iters", "5"])
    with pytest.raises(ConfigError, match="--train-epochs excludes --train-iters"):
        validate_args(args)


# ---------------------------------------------------------------- whole documents (shards from the tool)
def _spm(path):
    import sentencepiece as spm

    r = random.Random(0)
    model = io.BytesIO()
    extra = "The following answer shows says This article this".split()  # the rewrite's words, decodable
    sentences = [" ".join(["question"] + r.choices(WORDS + extra, k=8)) for _ in range(300)]
    spm.SentencePieceTrainer.train(sentence_iterator=iter(sentences), model_writer=model, vocab_size=60,
                                   model_type="unigram", hard_vocab_limit=False, normalization_rule_name="identity",
                                   user_defined_symbols=["question"])
    path.write_bytes(model.getvalue())
    return str(path)


def _tool(tmp_path, records, *flags, name="out"):
    inp = tmp_path / f"{name}.jsonl"
    inp.write_text("".join(json.dumps(r) + "\n" for r in records))
    prefix = str(tmp_path / name)
    argv = ["--input", str(inp), "--output-prefix", prefix, "--tokenizer-model", str(tmp_path / "spm.model"),
            "--codebook-size", "64", "--tokens-per-image", "16", *flags]
    return load_tool("preprocess_instruct").main(argv), prefix


@pytest.fixture(scope="module")
def instruct_shards(tmp_path_factory):
    """60 prompt/response documents; a few are longer than a sample (cut at the end, never split)."""
    tmp = tmp_path_factory.mktemp("instruct")
    _spm(tmp / "spm.model")
    r = random.Random(1)
    records = []
    for i in range(60):
        response = [{"text": " ".join(r.choices(WORDS, k=r.randint(3, 30) if i % 10 else 90))}]
        if i % 3 == 0:
            response.append({"image_tokens": [r.randrange(64) for _ in range(16)]})
        records.append({"prompt": "question " + " ".join(r.choices(WORDS, k=r.randint(1, 6))), "response": response})
    rc, prefix = _tool(tmp, records)
    assert rc == 0
    return tmp, prefix


def _documents(prefix):
    from megatron_jam.data.cm3_dataset import DocumentReader

    reader = DocumentReader(prefix, None)
    return [reader.tokens(d) for d in range(reader.num_documents)]


def _starts_a_document(full, docs):
    return any(np.array_equal(full[:min(d.size, SEQ + 1)], d[:SEQ + 1]) for d in docs)


def _samples(prefix, tmp, cm3, whole="auto", n=200):
    from megatron_jam.data.cm3_dataset import build_train_valid_test_datasets

    train, _, _ = build_train_valid_test_datasets([prefix], "100,0,0", SEQ, 7, (n, None, None), cm3,
                                                  whole_documents=whole, data_cache_path=str(tmp / f"c-{whole}"))
    for i in range(len(train)):
        s = train[i]
        yield np.concatenate([s["tokens"].numpy(), s["labels"].numpy()[-1:]]), s


def test_no_instruction_sample_starts_inside_a_response(instruct_shards, single_rank):
    import sentencepiece as spm

    from megatron_jam.data.cm3 import CM3Config, cm3_restore
    from megatron_jam.data.vocab import load_layout

    tmp, prefix = instruct_shards
    docs, layout = _documents(prefix), load_layout(prefix)
    question = spm.SentencePieceProcessor(model_file=str(tmp / "spm.model")).encode("question")  # [▁, question]
    assert all(d[:2].tolist() == question for d in docs) and sum(d.size > SEQ + 1 for d in docs) >= 3
    for full, s in _samples(prefix, tmp, CM3Config(enabled=False)):
        assert _starts_a_document(full, docs), "a sample does not start at a document's first token"
        assert s["loss_mask"][0] == 0  # the first label is still the prompt
    cut = 0
    for full, _ in _samples(prefix, tmp, CM3Config()):  # the recipe's objective: the restored sample starts so too
        restored = cm3_restore(full, layout)
        assert restored[:2].tolist() == question
        cut += int(full[-1] != layout.eos_id)
    assert cut > 0  # long documents were cut at the end, not split
    packed = [_starts_a_document(full, docs) for full, _ in _samples(prefix, tmp, None, whole="never")]
    assert not all(packed)  # the packed layout (pretraining data) does cut across documents


def test_prompt_loss_option(instruct_shards, single_rank):
    from megatron_jam.data.cm3_dataset import build_train_valid_test_datasets

    tmp, prefix = instruct_shards
    masks = {}
    for prompt_loss in (False, True):
        train, _, _ = build_train_valid_test_datasets([prefix], "100,0,0", SEQ, 7, (20, None, None), None,
                                                      prompt_loss=prompt_loss, data_cache_path=str(tmp / "pl"))
        masks[prompt_loss] = np.stack([train[i]["loss_mask"].numpy() for i in range(20)])
    assert (masks[True] >= masks[False]).all() and masks[True].sum() > masks[False].sum()


# ---------------------------------------------------------------- curation (paper section 3.1.1)
def test_curation_filters_caps_rewrites_and_counts(instruct_shards):
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    tmp, _ = instruct_shards
    image = {"image_tokens": list(range(16))}
    records = [
        {"rating": 95, "prompt": "question how make tea", "response": [{"text": "This article shows how."}]
         + [image, {"text": "pour"}] * 5},
        {"rating": 80, "prompt": "question boil", "response": "water"},
        {"prompt": "question pour", "response": "hot"},
        {"rating": 99, "prompt": "question steep", "response": "this article says steep"},
    ]
    flags = ["--min-rating", "90", "--max-images", "3", "--rewrite-this-article"]
    rc, prefix = _tool(tmp, records, *flags, name="curated")
    assert rc == 0  # half the records filtered, but filtering is wanted: not against --max-reject-fraction
    stats = json.load(open(prefix + ".stats.json"))
    assert stats["documents"] == 2 and stats["skipped_by_reason"] == {"low_rating": 1, "no_rating": 1}
    assert stats["curation"] == {"filtered": 2, "filtered_by_reason": {"low_rating": 1, "no_rating": 1},
                                 "images_dropped": 2, "documents_with_images_dropped": 1,
                                 "this_article_rewrites": 2, "documents_rewritten": 2}
    rejects = [json.loads(line) for line in open(prefix + ".rejects.jsonl")]
    assert [(r["line"], r["reason"]) for r in rejects] == [(2, "low_rating"), (3, "no_rating")]
    ds = IndexedDataset(prefix, multimodal=True)
    docs = ds.index.document_indices
    assert int((ds.index.sequence_modes[docs[0]:docs[1]] == 1).sum()) == 3  # the first three images kept
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(tmp / "spm.model"))
    text = " ".join(sp.decode([t for t in ds[i][0].tolist() if t < sp.get_piece_size()])  # no <break>, <eos>
                    for i in range(len(ds)) if ds.index.sequence_modes[i] == 0)
    assert "The following answer shows how" in text and "the following answer says" in text
    assert "article" not in text

    short = {"prompt": "question", "response": "hot"}
    rc, prefix = _tool(tmp, records[:1] + records[3:] + [short], "--max-images", "3", "--too-many-images", "reject",
                       "--max-document-tokens", "5", "--max-reject-fraction", "0", name="strict")
    stats = json.load(open(prefix + ".stats.json"))
    assert rc == 0 and stats["documents"] == 1
    assert stats["curation"]["filtered_by_reason"] == {"too_many_images": 1, "too_long": 1}


def test_best_checkpoint_survives_a_resume(tmp_path):
    """A resumed epoch run compares with the best it already recorded (read back from best_checkpoint.json)."""
    import argparse

    from megatron_jam.training.best_checkpoint import BestCheckpoint, read_best

    class Run:
        iteration, async_queue, saves = 0, None, []

        def save(self):
            self.saves.append(self.iteration)

    args = argparse.Namespace(save=str(tmp_path), valid_data_path=["a=x", "y/b"], epoch_iters=5)
    run = Run()
    for iteration, loss in ((5, 2.0), (10, 1.0)):
        run.iteration = iteration
        BestCheckpoint(args).observe(run, {"a": {"lm_loss": loss}, "b": {"lm_loss": loss}, "valid": {"lm_loss": 9}})
    resumed = BestCheckpoint(args)  # a new process: only the files remain
    run.iteration = 15
    assert not resumed.observe(run, {"a": {"lm_loss": 1.5}, "b": {"lm_loss": 1.5}})
    assert read_best(str(tmp_path)) == 10 and run.saves == [5, 10]
    assert [v["epoch"] for v in resumed.record["validations"]] == [1, 2, 3]
