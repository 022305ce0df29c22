"""lm-eval through the `megatron_jam` adapter equals a direct computation (issue 18, item 4).

A tiny Llama over a fused vocabulary (a 64-piece sentencepiece model, 2 sentinels, 16 image codes) is
imported with its layout and tokenizer; three local tasks are written here (task YAMLs over JSON-lines files:
multiple choice, rolling log-likelihood, greedy generation with a stop string), never downloaded, and run with
`lm_eval.simple_evaluate` at TP=1 and TP=2. Every log-likelihood must be the one computed directly from the
model's full forward (`<eos>` + the text's ids, log-softmax over the text ids and `<eos>`), the accuracy the
argmax of those, and each generation the direct greedy continuation over the same ids.
"""

import io
import json
import logging
import random

import pytest
import torch

SYLLABLES = "ka lo mi ter san bu ra ne zo pi".split()
WORDS = sorted({"".join(random.Random(i).choices(SYLLABLES, k=1 + i % 2)) for i in range(60)})
TASKS = ["jam_mc", "jam_rolling", "jam_gen"]
MAX_GEN = 6


def _sentence(rng, lo=3, hi=8):
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(lo, hi)))


def _write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def _task_yaml(name, data, cache, body):
    return (f"task: {name}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {data}\n"
            f"  cache_dir: {cache}\ntest_split: test\n{body}")


MC = """output_type: multiple_choice
doc_to_text: "{{question}}"
doc_to_choice: "{{choices}}"
doc_to_target: "{{label}}"
metric_list:
  - metric: acc
"""
ROLLING = """output_type: loglikelihood_rolling
doc_to_text: ""
doc_to_target: "{{text}}"
metric_list:
  - metric: word_perplexity
"""
GEN = """output_type: generate_until
doc_to_text: "{{prompt}}"
doc_to_target: "{{answer}}"
generation_kwargs:
  until: [STOP]
  max_gen_toks: %d
metric_list:
  - metric: exact_match
""" % MAX_GEN


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    """A converted checkpoint carrying `vocab_layout.json` and `tokenizer/` (what `load=` alone needs)."""
    import sentencepiece as spm

    import megatron_jam  # noqa: F401
    from megatron_jam.convert.checkpoint import ensure_single_rank
    from megatron_jam.data.text_tokenizer import load_text_tokenizer
    from megatron_jam.data.vocab import VocabLayout
    from parent_helpers import convert, make_llama

    ensure_single_rank()
    root = tmp_path_factory.mktemp("harness")
    rng, model = random.Random(0), io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter([_sentence(rng) for _ in range(300)]), model_writer=model,
                                   vocab_size=64, model_type="unigram", hard_vocab_limit=False,
                                   character_coverage=1.0)
    (root / "llm").mkdir()
    (root / "llm" / "tokenizer.model").write_bytes(model.getvalue())
    tok = load_text_tokenizer(str(root / "llm" / "tokenizer.model"))
    layout = VocabLayout(text_vocab_size=tok.vocab_size, codebook_size=16, tokens_per_image=4, num_sentinels=2,
                         text_eos_id=tok.eos_id, text_tokenizer=tok.identity)
    layout.to_json(str(root / "layout.json"))
    make_llama(root / "llm", seed=3, vocab=layout.vocab_size, initializer_range=0.3)
    convert("import", root / "ckpt", root / "llm", vocab_layout=str(root / "layout.json"), seq_length=64)
    assert (root / "ckpt" / "tokenizer" / "tokenizer.model").exists() and (root / "ckpt" / "vocab_layout.json").exists()
    return root / "ckpt", layout, tok


# ------------------------------------------------------------------ the direct computation
def _reference_model(path):
    from megatron_jam.convert.checkpoint import load_checkpoint
    from megatron_jam.models.kinds import load_model_config, model_class
    from megatron_jam.parallel.initialize import initialize_model_parallel
    from megatron_jam.parallel.model import build_model_chunks, parallel_kwargs

    initialize_model_parallel(tp=1)
    cfg = load_model_config(str(path))
    chunks = build_model_chunks(model_class(cfg), cfg, parallel_kwargs(tp=1), wrap_ddp=False, parallel_output=False)
    load_checkpoint(chunks, str(path))
    return chunks[0].eval()


class Direct:
    """Log-probabilities and greedy text from the full forward, over the text ids and `<eos>` only."""

    def __init__(self, model, layout, tok):
        self.model, self.layout, self.tok = model, layout, tok
        ids = torch.arange(layout.vocab_size)
        self.allowed = torch.from_numpy(layout.is_text(ids.numpy())) | (ids == layout.eos_id)
        assert not self.allowed[layout.image_offset:].any() and not self.allowed[layout.break_id]

    @torch.no_grad()
    def log_probs(self, ids, restrict=True):
        """log p(ids[i+1] | ids[:i+1]) for every i: `[len(ids) - 1]`."""
        x = torch.tensor([ids])
        logits = self.model(x, torch.arange(len(ids))[None])[0, :, : self.layout.vocab_size].double()
        if restrict:
            logits = logits.masked_fill(~self.allowed, float("-inf"))
        logp = torch.log_softmax(logits, dim=-1)[:-1]
        return logp.gather(-1, x[0, 1:, None])[:, 0], logp.argmax(-1) == x[0, 1:]

    def loglikelihood(self, context, continuation, restrict=True):
        eos = self.layout.eos_id
        ctx = [eos] + self.tok.encode(context)
        whole = [eos] + self.tok.encode(context + continuation)
        assert whole[: len(ctx)] == ctx
        logp, greedy = self.log_probs(whole, restrict)
        n = len(whole) - len(ctx)
        return float(logp[-n:].sum()), bool(greedy[-n:].all())

    def rolling(self, text, max_length=64):
        ids = self.tok.encode(text)
        first, _ = self.log_probs([self.layout.eos_id] + ids[:max_length])  # the first window: max_length targets
        total = float(first.sum())
        if len(ids) > max_length:  # one more window (len < 2 * max_length): the last max_length + 1 ids
            assert len(ids) < 2 * max_length
            rest, _ = self.log_probs(ids[-(max_length + 1):])
            total += float(rest[-(len(ids) - max_length):].sum())
        return total

    @torch.no_grad()
    def greedy(self, context, steps=MAX_GEN):
        ids, new = [self.layout.eos_id] + self.tok.encode(context), []
        for _ in range(steps):
            x = torch.tensor([ids + new])
            logits = self.model(x, torch.arange(x.shape[1])[None])[0, -1, : self.layout.vocab_size]
            tok = int(logits.masked_fill(~self.allowed, float("-inf")).argmax())
            if tok == self.layout.eos_id:
                break
            new.append(tok)
        return self.tok.decode(new)


@pytest.fixture(scope="module")
def direct(ckpt, single_rank):
    path, layout, tok = ckpt
    return Direct(_reference_model(path), layout, tok)


@pytest.fixture(scope="module")
def tasks(ckpt, direct, tmp_path_factory):
    """The three task YAMLs and their data; the generation task's stop string is a word the model writes."""
    root = tmp_path_factory.mktemp("tasks")
    rng = random.Random(5)
    mc = [{"question": _sentence(rng), "choices": [_sentence(rng, 1, 3) for _ in range(3)], "label": i % 3}
          for i in range(6)]
    mc[0]["question"], mc[0]["choices"][1] = _greedy_word(direct, rng)  # a continuation that is the greedy one
    rolling = [{"text": _sentence(rng)}, {"text": _sentence(rng, 90, 90)}]
    assert 64 < len(ckpt[2].encode(rolling[1]["text"])) < 128  # two windows of max_length 64
    prompts = [_sentence(rng) for _ in range(3)]
    written = [direct.greedy(p) for p in prompts]
    stop = next(w for text in written for w in text.split()[1:])  # a word a generation writes after its first
    gen = [{"prompt": p, "answer": w.split(stop)[0]} for p, w in zip(prompts, written)]
    cache = root / "hf_cache"
    for name, rows, body in (("jam_mc", mc, MC), ("jam_rolling", rolling, ROLLING),
                             ("jam_gen", gen, GEN.replace("STOP", json.dumps(stop)))):
        (root / f"{name}.yaml").write_text(_task_yaml(name, _write_jsonl(root / f"{name}.jsonl", rows), cache, body))
    return {"path": str(root), "stop": stop, "written": dict(zip(prompts, written))}


def _greedy_word(direct, rng):
    """(question, word) where the word, after a space, is one piece and the model's greedy next token."""
    tok = direct.tok
    for _ in range(200):
        question = _sentence(rng)
        word = direct.greedy(question, steps=1)
        ids = tok.encode(question)
        if word and tok.encode(f"{question} {word}") == ids + tok.encode(word) and len(tok.encode(word)) == 1:
            return question, word
    raise AssertionError("no question whose greedy continuation is a whole word")


def run_harness(include_path, model_args):
    """`simple_evaluate` of the three local tasks, by model name (the registration users rely on)."""
    import megatron_jam.harness  # noqa: F401
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    out = simple_evaluate(model="megatron_jam", model_args=model_args, tasks=TASKS, batch_size=4,
                          task_manager=TaskManager(include_path=include_path), log_samples=True)
    if out is None:  # lm-eval's TP convention: every rank runs every request, LOCAL_RANK 0 reports
        return None
    samples = {t: [(s["doc"], s["arguments"], s["resps"]) for s in out["samples"][t]] for t in TASKS}
    return {"results": {t: dict(out["results"][t]) for t in TASKS}, "samples": samples}


def _tp2_harness(include_path, ckpt_path):
    return run_harness(include_path, f"load={ckpt_path},tp=2")


def _check(got, direct, stop, tol):
    mc = got["samples"]["jam_mc"]
    correct = []
    greedy_seen = False
    for doc, arguments, resps in mc:
        scores = []
        for (context, continuation), [(logp, greedy)] in zip(arguments, resps):
            want, want_greedy = direct.loglikelihood(context, continuation)
            assert logp == pytest.approx(want, abs=tol) and greedy == want_greedy
            scores.append(want)
            greedy_seen |= greedy
        correct.append(max(range(len(scores)), key=scores.__getitem__) == doc["label"])
    assert greedy_seen
    assert got["results"]["jam_mc"]["acc,none"] == pytest.approx(sum(correct) / len(correct))
    for doc, _, [[logp]] in got["samples"]["jam_rolling"]:
        assert logp == pytest.approx(direct.rolling(doc["text"]), abs=tol)
    for doc, _, [[text]] in got["samples"]["jam_gen"]:
        assert text == direct.greedy(doc["prompt"]).split(stop)[0]
    assert got["results"]["jam_gen"]["exact_match,none"] == 1.0


@pytest.fixture(scope="module")
def tp1(ckpt, tasks, single_rank):
    return run_harness(tasks["path"], f"load={ckpt[0]}")


def test_tp1_equals_the_direct_computation(ckpt, direct, tasks, tp1):
    got = tp1
    _check(got, direct, tasks["stop"], tol=1e-4)
    assert any(tasks["stop"] in w for w in tasks["written"].values())  # the stop string did cut a generation
    # the restriction matters: over the whole fused vocabulary the scores would differ
    context, continuation = got["samples"]["jam_mc"][0][1][0]
    assert abs(direct.loglikelihood(context, continuation, restrict=False)[0]
               - direct.loglikelihood(context, continuation)[0]) > 1e-3


def test_tp2_equals_the_direct_computation(ckpt, direct, tasks, pool2):
    ranks = pool2.run(_tp2_harness, tasks["path"], str(ckpt[0]), timeout_s=240)
    assert ranks[1] is None  # rank 1 ran the same forwards (its collectives matched) and reports nothing
    _check(ranks[0], direct, tasks["stop"], tol=1e-4)


def test_the_tool_and_the_lm_eval_command_line_write_the_same_scores(ckpt, tasks, tp1, tmp_path, capsys):
    """tools/eval_harness.py and `python -m megatron_jam.harness` (lm-eval's CLI), in this process."""
    from tool_loader import load_tool

    from megatron_jam.harness.__main__ import main as lm_eval_cli

    argv = ["--load", str(ckpt[0]), "--tasks", "jam_mc,jam_rolling", "--include-path", tasks["path"],
            "--batch-size", "3", "--output", str(tmp_path / "tool.json")]
    assert load_tool("eval_harness").main(argv) == 0
    assert "jam_mc" in capsys.readouterr().out  # the table
    lm_log = logging.getLogger("lm_eval")
    saved = list(lm_log.handlers), lm_log.propagate, lm_log.level
    try:  # lm-eval's CLI adds a handler on this test's captured stderr: taken off after
        assert lm_eval_cli(["--model", "megatron_jam", "--model_args", f"load={ckpt[0]}", "--tasks",
                            "jam_mc,jam_rolling", "--include_path", tasks["path"], "--output_path",
                            str(tmp_path / "cli")]) == 0
    finally:
        lm_log.handlers[:], lm_log.propagate = saved[0], saved[1]
        lm_log.setLevel(saved[2])
    cli = json.loads(next((tmp_path / "cli").rglob("results_*.json")).read_text())
    tool = json.loads((tmp_path / "tool.json").read_text())
    for got in (tool, cli):
        assert got["results"]["jam_mc"]["acc,none"] == tp1["results"]["jam_mc"]["acc,none"]
        assert got["results"]["jam_rolling"]["word_perplexity,none"] == pytest.approx(
            tp1["results"]["jam_rolling"]["word_perplexity,none"], rel=1e-6)


def test_a_missing_tokenizer_or_layout_names_the_model_arg(ckpt, tasks, tmp_path, capsys, single_rank):
    import shutil

    from tool_loader import load_tool

    from megatron_jam.harness import MegatronJamLM
    from megatron_jam.inference.loading import GenerationSetupError

    bare = tmp_path / "bare"
    shutil.copytree(ckpt[0], bare, ignore=shutil.ignore_patterns("tokenizer"))
    argv = ["--load", str(bare), "--tasks", "jam_mc", "--include-path", tasks["path"]]
    assert load_tool("eval_harness").main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "tokenizer_model=PATH" in err[0] and "--model_args" in err[0]
    (bare / "vocab_layout.json").unlink()
    with pytest.raises(GenerationSetupError, match="vocab_layout=PATH"):
        MegatronJamLM(load=str(bare))
