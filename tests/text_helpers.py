"""Generated text for the tests that train a tiny tokenizer (sentencepiece or tokenizer.json) in-process:
sentences of made-up words built from a few syllables, so that a 64..256-piece model covers them."""

import random

SYLLABLES = "ka lo mi ter san bu ra ne zo pi qua fel dor im ux gra spe thi wo vy".split()
WORDS = sorted({"".join(random.Random(i).choices(SYLLABLES, k=1 + i % 3)) for i in range(300)})


def sentence(rng):
    """3 to 12 random WORDS (rng: a `random.Random`)."""
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 12)))
