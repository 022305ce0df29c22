"""`python -m megatron_jam.training.tiny_corpus OUT_DIR`: the embedded tiny corpus of the laptop default.

Why generated and not downloaded: nothing may be fetched at run time, and
the corpus must be learnable, so a loss curve means something. Text follows
a small grammar ("the red cat sits on the mat ."); an image is 16 codes of a
64-entry codebook whose first half is a pattern of the caption's colour and
second half of its object, so the image model can learn caption -> image.
Writes `text.jsonl` (text-only, the LLM's data), `imgtext.jsonl` (caption +
image documents, some with text after the image), and a sentencepiece model
`spm.model` trained on the text.
"""

import argparse
import io
import json
import os
import random

from megatron_jam.utils.logging import get_logger

COLORS = ["red", "blue", "green", "yellow", "black", "white", "pink", "brown"]
OBJECTS = ["cat", "dog", "bird", "car", "tree", "house", "boat", "cup"]
VERBS = ["sits on", "runs to", "looks at", "stands near", "jumps over", "sleeps under"]
PLACES = ["the mat", "the park", "the river", "the hill", "the road", "the table"]
CODEBOOK, TOKENS_PER_IMAGE = 64, 16


def sentence(rng: random.Random) -> str:
    return f"the {rng.choice(COLORS)} {rng.choice(OBJECTS)} {rng.choice(VERBS)} {rng.choice(PLACES)} ."


def image_codes(color: str, obj: str) -> list[int]:
    """A fixed 16-code 'image' of a coloured object (4 x 4 grid: colour rows, then object rows)."""
    c, o = COLORS.index(color), OBJECTS.index(obj)
    return [(c * 4 + i) % 32 for i in range(8)] + [32 + (o * 4 + i) % 32 for i in range(8)]


def write_corpus(out_dir: str, n_text: int = 1500, n_imgtext: int = 1500, seed: int = 0) -> dict:
    os.makedirs(out_dir, exist_ok=True)
    rng = random.Random(seed)
    texts = [" ".join(sentence(rng) for _ in range(rng.randint(2, 6))) for _ in range(n_text)]
    with open(os.path.join(out_dir, "text.jsonl"), "w") as f:
        for i, t in enumerate(texts):
            f.write(json.dumps({"id": f"text-{i}", "text": t}) + "\n")
    with open(os.path.join(out_dir, "imgtext.jsonl"), "w") as f:
        for i in range(n_imgtext):
            color, obj = rng.choice(COLORS), rng.choice(OBJECTS)
            content = [{"text": f"a picture of a {color} {obj} ."}, {"image_tokens": image_codes(color, obj)}]
            if rng.random() < 0.3:
                content.append({"text": sentence(rng)})
            f.write(json.dumps({"id": f"imgtext-{i}", "content": content}) + "\n")
    _train_sentencepiece(texts, os.path.join(out_dir, "spm.model"))
    return {"text": os.path.join(out_dir, "text.jsonl"), "imgtext": os.path.join(out_dir, "imgtext.jsonl"),
            "tokenizer": os.path.join(out_dir, "spm.model")}


def _train_sentencepiece(texts: list[str], path: str) -> None:
    import sentencepiece as spm

    extra = [f"a picture of a {c} {o} ." for c in COLORS for o in OBJECTS]
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(texts + extra), model_writer=model, vocab_size=64,
                                   hard_vocab_limit=False, model_type="word", character_coverage=1.0, bos_id=-1, eos_id=1, unk_id=0,
                                   pad_id=-1, minloglevel=2, num_threads=1)
    with open(path, "wb") as f:
        f.write(model.getvalue())


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("out_dir")
    p.add_argument("--num-text-docs", type=int, default=1500)
    p.add_argument("--num-image-text-docs", type=int, default=1500)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    return write_corpus(a.out_dir, a.num_text_docs, a.num_image_text_docs, a.seed)


if __name__ == "__main__":
    get_logger(__name__).info("%s", json.dumps(main()))
