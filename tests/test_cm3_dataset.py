"""The JAM dataset through Megatron's BlendedMegatronDatasetBuilder, and instruction data.

Blend proportions, determinism across builds (cache hit and cold), resume at
sample N, document-level splits, the modality tensor, and the loss mask of
instruction documents (prompt tokens carry no loss), including
tools/preprocess_instruct.py end to end.
"""

import io
import json
import os
import random
import sys

import numpy as np
import pytest

from jam_data_helpers import LAYOUT, image_text_corpus, text_only_corpus, write_dataset
from megatron_jam.data.cm3 import CM3Config, cm3_restore
from megatron_jam.data.cm3_dataset import build_train_valid_test_datasets
from megatron_jam.data.documents import IMAGE, TEXT
from megatron_jam.data.instruct import build_instruct_sequences, instruction_turns, loss_mask_path

L = LAYOUT
SEQ = 64
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    root = tmp_path_factory.mktemp("shards")
    rng = np.random.default_rng(0)
    return {"text": write_dataset(root / "text", text_only_corpus(rng, 400)),
            "imgtext": write_dataset(root / "imgtext", image_text_corpus(rng, 400)), "root": root}


def build(shards, cache, seed=1234, cm3=CM3Config(), sizes=(3000, 100, 100), weights=("0.3", "0.7")):
    blend = [weights[0], shards["text"], weights[1], shards["imgtext"]]
    return build_train_valid_test_datasets(blend, "90,5,5", SEQ, seed, sizes, cm3, data_cache_path=str(cache))


def same(a, b):
    return all(np.array_equal(np.asarray(a[k]), np.asarray(b[k])) for k in a)


def test_blend_proportion_and_modality(shards, tmp_path, single_rank):
    train, valid, test = build(shards, tmp_path / "cache")
    assert len(train) == 3000 and len(valid) == 100 and len(test) == 100
    ids = np.array([train[i]["dataset_id"] for i in range(len(train))])
    assert abs((ids == 1).mean() - 0.7) <= 0.01  # Megatron's blending is deterministic: error < 1/size
    for i in range(0, 3000, 37):
        s = train[i]
        assert set(s) >= {"tokens", "labels", "loss_mask", "position_ids", "modality"}
        assert all(s[k].shape == (SEQ,) for k in ("tokens", "labels", "loss_mask", "position_ids", "modality"))
        np.testing.assert_array_equal(s["modality"].numpy(), L.is_image(s["labels"].numpy()))
        if s["dataset_id"] == 0:
            assert s["modality"].sum() == 0
    assert sum(int(train[i]["modality"].sum()) for i in range(200)) > 0


def test_same_samples_second_build_cold_cache_and_resume(shards, tmp_path, single_rank):
    first, _, _ = build(shards, tmp_path / "a")
    files = sorted(os.listdir(tmp_path / "a"))
    assert any("JamDataset-train-shuffle_index" in f for f in files)
    mtimes = {f: os.path.getmtime(tmp_path / "a" / f) for f in files}
    again, _, _ = build(shards, tmp_path / "a")  # cache hit
    assert {f: os.path.getmtime(tmp_path / "a" / f) for f in files} == mtimes
    cold, _, _ = build(shards, tmp_path / "b")
    for i in range(0, 3000, 101):
        assert same(first[i], again[i]) and same(first[i], cold[i])
    n = 1234  # simulated resume: a fresh process builds the datasets and starts at sample n
    resumed, _, _ = build(shards, tmp_path / "a")
    assert all(same(first[n + i], resumed[n + i]) for i in range(64))
    other, _, _ = build(shards, tmp_path / "c", seed=99)
    assert not all(same(first[i], other[i]) for i in range(8))


def test_splits_are_disjoint_documents(shards, tmp_path, single_rank):
    train, valid, test = build(shards, tmp_path / "cache", weights=("1", "1"))
    for k in range(2):
        docs = [set(ds.datasets[k].indices.tolist()) for ds in (train, valid, test)]
        assert not (docs[0] & docs[1]) and not (docs[0] & docs[2]) and not (docs[1] & docs[2])
        assert len(docs[0]) == 360 and len(docs[1]) == 20


def test_cm3_off_gives_raw_windows(shards, tmp_path, single_rank):
    plain, _, _ = build_train_valid_test_datasets([shards["imgtext"]], "100,0,0", SEQ, 7, (500, None, None), None,
                                                  data_cache_path=str(tmp_path / "c"))
    cm3, _, _ = build_train_valid_test_datasets([shards["imgtext"]], "100,0,0", SEQ, 7, (500, None, None),
                                                CM3Config(poisson_lambda=2), data_cache_path=str(tmp_path / "c"))
    masked = 0
    for i in range(0, 500, 7):
        p, c = plain[i], cm3[i]
        assert p["loss_mask"].sum() == SEQ
        raw = np.concatenate([p["tokens"].numpy(), p["labels"].numpy()[-1:]])
        restored = cm3_restore(np.concatenate([c["tokens"].numpy(), c["labels"].numpy()[-1:]]), L)
        np.testing.assert_array_equal(restored, raw[:restored.size])
        masked += restored.size < raw.size
    assert masked > 40


# ---------------------------------------------------------------- instruction data
PROMPT_IDS, RESPONSE_IDS = (0, 100), (100, 200)


def instruct_doc(rng):
    """Prompt text (ids < 100), response text (ids >= 100) with an image; sometimes a second exchange."""
    def text(lo_hi):
        return (TEXT, rng.integers(*lo_hi, int(rng.integers(1, 20))))
    image = (IMAGE, L.image_offset + rng.integers(0, L.codebook_size, L.tokens_per_image))
    turns = [(False, text(PROMPT_IDS)), (True, text(RESPONSE_IDS)), (True, image)]
    if rng.random() < 0.5:
        turns += [(False, image), (False, text(PROMPT_IDS)), (True, text(RESPONSE_IDS))]
    return build_instruct_sequences([(loss, kind, ids) for loss, (kind, ids) in turns], L)


def test_instruction_loss_mask(tmp_path, single_rank):
    rng = np.random.default_rng(5)
    docs = [instruct_doc(rng) for _ in range(200)]
    flags = [f for d in docs for f in d[2]]
    prefix = write_dataset(tmp_path / "sft", [(s, m) for s, m, _ in docs], loss_flags=flags)
    train, _, _ = build_train_valid_test_datasets([prefix], "100,0,0", SEQ, 3, (300, None, None),
                                                  CM3Config(enabled=False), data_cache_path=str(tmp_path / "c"))
    seen = 0
    for i in range(len(train)):
        s = train[i]
        labels, mask = s["labels"].numpy(), s["loss_mask"].numpy()
        prompt = labels < PROMPT_IDS[1]
        assert not mask[prompt].any(), "a prompt token carries loss"
        assert (mask[(labels >= RESPONSE_IDS[0]) & (labels < RESPONSE_IDS[1])] == 1).all()
        eos = np.flatnonzero(labels == L.eos_id)  # one document per sample (instruction data), then padding
        assert eos.size == 0 or (mask[eos[0]] == 1 and not mask[eos[1:]].any())  # its <eos> is a response's
        seen += int(prompt.sum())
    assert seen > 1000


def test_instruct_layout_break_belongs_to_next_turn():
    img = L.image_offset + np.arange(L.tokens_per_image)
    seqs, modes, flags = build_instruct_sequences(
        [(False, TEXT, np.array([1, 2])), (True, IMAGE, img), (True, TEXT, np.array([150])),
         (False, TEXT, np.array([3]))], L)
    assert [s.tolist() for s in seqs] == [[1, 2], [L.break_id], img.tolist(), [L.break_id, 150], [3, L.eos_id]]
    assert modes == [0, 0, 1, 0, 0] and flags == [0, 1, 1, 1, 0]
    turns = instruction_turns({"messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "u"},
                                            {"role": "assistant", "content": [{"text": "a"}]}]})
    assert [loss for loss, _ in turns] == [False, False, True]


def test_preprocess_instruct_tool(tmp_path, single_rank):
    import sentencepiece as spm

    sys.path.insert(0, os.path.join(REPO, "tools"))
    import preprocess_instruct

    words = "how make tea answer the following cup water boil pour steep minutes".split()
    r = random.Random(0)
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter([" ".join(r.choices(words, k=8)) for _ in range(200)]),
                                   model_writer=model, vocab_size=60, model_type="unigram", hard_vocab_limit=False,
                                   normalization_rule_name="identity")
    (tmp_path / "spm.model").write_bytes(model.getvalue())
    records = [{"prompt": "how make tea", "response": [{"text": "the following answer"},
                                                       {"image_tokens": list(range(16))}]},
               {"messages": [{"role": "user", "content": "boil water"}, {"role": "assistant", "content": "pour"}]},
               {"messages": [{"role": "user", "content": "no answer"}]}]
    (tmp_path / "sft.jsonl").write_text("".join(json.dumps(x) + "\n" for x in records))
    prefix = str(tmp_path / "out")
    assert preprocess_instruct.main(["--input", str(tmp_path / "sft.jsonl"), "--output-prefix", prefix,
                                     "--tokenizer-model", str(tmp_path / "spm.model"), "--codebook-size", "64",
                                     "--tokens-per-image", "16", "--max-reject-fraction", "0.5"]) == 0
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    ds = IndexedDataset(prefix, multimodal=True)
    flags = np.load(loss_mask_path(prefix))
    assert len(ds.index.document_indices) == 3 and flags.size == len(ds)
    sp = spm.SentencePieceProcessor(model_file=str(tmp_path / "spm.model"))
    assert sp.decode(ds[0][0].tolist()) == "how make tea" and flags[0] == 0
    # doc 0: prompt | response text + <break> | image | <eos>; doc 1: user | assistant + <eos>
    assert flags.tolist() == [0, 1, 1, 1, 0, 1]
    assert [r["reason"] for r in map(json.loads, open(prefix + ".rejects.jsonl"))] == ["no_loss_turn"]


def test_unconditional_context_of_guidance_is_trained(shards, tmp_path, single_rank):
    """Every id of the unconditional row that generation builds (`<sentinel:0> <break>`) occurs in training
    samples, and as that very bigram (a caption masked whole before its image), never `<mask>`."""
    from megatron_jam.inference.decoding import unconditional_id

    train, _, _ = build(shards, tmp_path / "cache", cm3=CM3Config(caption_mask_prob=0.1), sizes=(400, 10, 10),
                        weights=("0.0001", "1"))
    uncond = [unconditional_id(L), L.break_id]
    seen, bigrams = set(), 0
    for i in range(len(train)):
        tokens = train[i]["tokens"].numpy()
        seen.update(tokens.tolist())
        bigrams += int(((tokens[:-1] == uncond[0]) & (tokens[1:] == uncond[1])).sum())
    assert set(uncond) <= seen and L.mask_id not in seen
    assert bigrams >= 20, bigrams


# ---------------------------------------------------------------- splits without documents
class _Deadline:
    """Fail (instead of hanging the suite) if the block runs longer than `seconds`: Megatron's
    index builder used to loop forever over a split of 0 documents."""

    def __init__(self, seconds):
        self.seconds = seconds

    def __enter__(self):
        import signal

        def expired(signum, frame):
            raise TimeoutError(f"still building after {self.seconds} s (a split of 0 documents hangs?)")
        self.previous = signal.signal(signal.SIGALRM, expired)
        signal.alarm(self.seconds)

    def __exit__(self, *exc):
        import signal

        signal.alarm(0)
        signal.signal(signal.SIGALRM, self.previous)


@pytest.fixture(scope="module")
def tiny40(tmp_path_factory):
    """40 documents: Megatron's default --split 969,30,1 cuts them 39 / 1 / 0."""
    return write_dataset(tmp_path_factory.mktemp("tiny") / "text", text_only_corpus(np.random.default_rng(1), 40))


def test_a_split_without_documents_is_a_clear_error_not_a_hang(tiny40, tmp_path, single_rank):
    from megatron_jam.models.config import ConfigError

    def build40(split, sizes, blend=(tiny40,)):
        return build_train_valid_test_datasets(list(blend), split, SEQ, 1, sizes, None,
                                               data_cache_path=str(tmp_path / "c"))

    with _Deadline(30):
        with pytest.raises(ConfigError, match=r"text: split 969,30,1 gives 0 test documents out of 40 "
                                              r"\(train 39, validation 1, test 0\) but 4 test samples"):
            build40("969,30,1", (4, 4, 4))
        with pytest.raises(ConfigError, match="split 990,10,0 gives 0 validation documents out of 40"):
            build40("990,10,0", (4, 4, 0))
        with pytest.raises(ConfigError, match="gives 0 validation documents out of 40"):  # each prefix of a blend
            build40("990,10,0", (4, 4, 0), blend=("0.5", tiny40, "0.5", tiny40))
        train, valid, test = build40("969,30,1", (4, 4, 0))  # 0 samples wanted: an empty set, no index
        assert len(train) >= 4 and len(valid) == 4 and len(test) == 0
        assert not any("test" in f for f in os.listdir(tmp_path / "c"))
        train, _, test = build40("969,30,1", (4, None, None))  # one epoch of no documents: empty
        assert len(test) == 0


def test_the_trainer_builds_only_the_splits_it_reads(tiny40, tmp_path, single_rank):
    """The reported hang: `megatron_jam.pretrain --data-path <40 documents>` with the default --split
    never got past the model; the unused test split (0 documents) wanted eval-iters x batch samples."""
    from types import SimpleNamespace

    from megatron_jam.models.config import ConfigError
    from megatron_jam.training.arguments import build_parser
    from megatron_jam.training.data import build_data_sources

    def sources(*flags):
        args = build_parser().parse_args(["--data-path", tiny40, "--no-cm3", "--train-iters", "2", "--seq-length",
                                          str(SEQ), "--micro-batch-size", "2", "--global-batch-size", "2",
                                          "--data-cache-path", str(tmp_path / "c"), *flags])
        return build_data_sources(args, SimpleNamespace(vocab_size=L.vocab_size))

    with _Deadline(30):
        train, valid_sets = sources()  # default split, no --eval-interval
        assert len(train.dataset) >= 4 and valid_sets == {}
        train, valid_sets = sources("--eval-interval", "1", "--cm3-validation")
        assert set(valid_sets) == {"valid"} and len(valid_sets["valid"].dataset) == 3 * 2 * 2
        train, valid_sets = sources("--eval-interval", "1")  # per document (the default): no samples built
        assert valid_sets["valid"].sources == [(tiny40, range(39, 40))]  # Megatron's valid split of 969,30,1
        train, valid_sets = sources("--split", "990,10,0")  # no evaluation: the empty valid split is fine
        assert valid_sets == {}
        with pytest.raises(ConfigError, match="split 990,10,0 gives 0 validation documents out of 40"):
            sources("--split", "990,10,0", "--eval-interval", "1")
