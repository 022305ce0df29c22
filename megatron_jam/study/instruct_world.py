"""The picture world's instruction set: "how to draw X ." -> the how-to answer with its pictures.

Why this shape: the paper instruction-tunes on wikiHow, whose article title is the
prompt and whose steps with pictures are the answer (section 3.1.1). The world's
how-to documents are exactly that, so the prompt is the title and the response the
steps, each followed by its drawn picture. Only the world's words are used (the
sentencepiece model is word-level and knows nothing else). Written as JSON Lines in
the ``{"prompt", "response"}`` format of tools/preprocess_instruct.py.
"""

from __future__ import annotations

import json
import os
import random

from megatron_jam.data.picture_world import COLOURS, SHAPES, draw, how_to_steps


def instruction_record(index: int, rng: random.Random, folder: str, image_size: int) -> dict:
    """One prompt/response pair; its pictures are saved under ``folder/images/``."""
    things = [(rng.choice(COLOURS), rng.choice(SHAPES)) for _ in range(rng.randint(1, 3))]
    title, steps = how_to_steps(things)
    response = []
    for j, ((colour, shape), step) in enumerate(zip(things, steps)):
        rel = f"images/{index:05d}_{j}.png"
        draw(colour, shape, rng, image_size).save(os.path.join(folder, rel), format="PNG")
        response += [{"text": step}, {"image": rel}]
    response.append({"text": "done ."})
    return {"id": f"instruct-{index}", "prompt": title, "response": response}


def write_instructions(folder: str, count: int, seed: int, image_size: int = 32) -> str:
    """Write ``folder/instruct.jsonl`` with `count` records (its own seeded stream); returns its path."""
    os.makedirs(os.path.join(folder, "images"), exist_ok=True)
    rng = random.Random(f"study-instruct:{seed}")
    path = os.path.join(folder, "instruct.jsonl")
    with open(path, "w", encoding="utf-8") as f:
        for i in range(count):
            f.write(json.dumps(instruction_record(i, rng, folder, image_size)) + "\n")
    return path
