"""How well generated images follow their prompt: text-to-image runs over a prompt set, scored.

Why a module of its own: classifier-free guidance, the tokenizer and the
training recipe are judged by one number each, measured the same way every
time (`tools/evaluate_generation.py`, the study runs, the docs' tables).

Two scorers:

- **attributes** (the picture world of `megatron_jam.data.picture_world`):
  each prompt names a colour and a shape; the exact attribute reader recovers
  both from the decoded pixels. Accuracy per attribute and joint, next to
  chance (1 / number of colours, 1 / shapes, their product).
- **clip** (real data): CLIP score, 100 * max(cos(text, image), 0), with a
  local `transformers` CLIP folder (the model retrieval already embeds with).

Each request is the prompt's tokens followed by `<break>`, so the generator
starts in image mode and samples exactly one image (`tokens_per_image` ids,
guided by `<sentinel:0> <break>` as the unconditional context).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import numpy as np

from megatron_jam.utils.logging import get_logger

logger = get_logger(__name__)


@dataclass(frozen=True)
class PromptItem:
    """One line of a prompt set: the text, and for the picture world the attributes it asks for."""

    name: str
    prompt: str
    colour: Optional[str] = None
    shape: Optional[str] = None


def read_prompt_set(path: str) -> list[PromptItem]:
    """JSON Lines `{"prompt": TEXT, "name"?, "colour"?, "shape"?}`; errors name the file and line."""
    from megatron_jam.utils.jsonl import read_records

    items = []
    for n, rec in read_records(path, '{"prompt": TEXT, ...}'):
        if not isinstance(rec.get("prompt"), str):
            raise ValueError(f'{path}:{n}: expected {{"prompt": TEXT, ...}}')
        items.append(PromptItem(name=str(rec.get("name") or f"prompt_{len(items):04d}"), prompt=rec["prompt"],
                                colour=rec.get("colour"), shape=rec.get("shape")))
    if not items:
        raise ValueError(f"{path}: no prompts")
    return items


class AttributeScorer:
    """Colour / shape of a picture-world image, read from its pixels."""

    kind = "attributes"

    def __init__(self, items: Sequence[PromptItem]):
        from megatron_jam.data import picture_world

        missing = [it.name for it in items if it.colour is None or it.shape is None]
        if missing:
            raise ValueError(f"the attribute scorer needs 'colour' and 'shape' in every prompt; "
                             f"missing in {missing[0]}")
        self.read = picture_world.read_attributes
        self.chance = {"colour_accuracy": 1 / len(picture_world.COLOURS),
                       "shape_accuracy": 1 / len(picture_world.SHAPES),
                       "joint_accuracy": 1 / (len(picture_world.COLOURS) * len(picture_world.SHAPES))}

    def row(self, item: PromptItem, image) -> dict:
        got = self.read(image)
        return {"read_colour": got.colour, "read_shape": got.shape, "colour_ok": got.colour == item.colour,
                "shape_ok": got.shape == item.shape,
                "joint_ok": got.colour == item.colour and got.shape == item.shape}

    @staticmethod
    def summary(rows: list[dict]) -> dict:
        n = max(len(rows), 1)
        return {f"{k}_accuracy": sum(r[f"{k}_ok"] for r in rows) / n for k in ("colour", "shape", "joint")}


class ClipScorer:
    """CLIP score of (prompt, image) with a local `transformers` CLIP folder (no download)."""

    kind = "clip"
    chance: dict = {}

    def __init__(self, model_dir: str):
        import transformers

        if not os.path.isdir(model_dir):
            raise FileNotFoundError(f"--clip-model {model_dir}: no such folder")
        self.model = transformers.CLIPModel.from_pretrained(model_dir, local_files_only=True,
                                                            use_safetensors=True).eval()
        self.processor = transformers.CLIPProcessor.from_pretrained(model_dir, local_files_only=True)

    def row(self, item: PromptItem, image) -> dict:
        import torch

        inputs = self.processor(text=[item.prompt], images=[image], return_tensors="pt", padding=True)
        with torch.no_grad():
            t = _features(self.model.get_text_features(input_ids=inputs["input_ids"],
                                                       attention_mask=inputs["attention_mask"]))
            v = _features(self.model.get_image_features(pixel_values=inputs["pixel_values"]))
        cos = float(torch.nn.functional.cosine_similarity(t, v).item())
        return {"clip_score": 100.0 * max(cos, 0.0)}

    @staticmethod
    def summary(rows: list[dict]) -> dict:
        scores = np.array([r["clip_score"] for r in rows], dtype=np.float64)
        return {"clip_score": float(scores.mean()) if scores.size else 0.0}


def _features(out):
    """`get_*_features` returns a tensor or, in newer transformers, an output with `pooler_output`."""
    return out if hasattr(out, "shape") else out.pooler_output


def make_scorer(items: Sequence[PromptItem], clip_model: Optional[str]):
    """CLIP when a CLIP folder is given, else the picture world's attribute reader."""
    return ClipScorer(clip_model) if clip_model else AttributeScorer(items)


def text_to_image(generator, vq, prompts: list[list[int]], params, break_id: int,
                  on_step: Optional[Callable[[int], None]] = None) -> tuple[list, list[list[int]]]:
    """(decoded PIL images, their codes), one per prompt (ids): the prompt + the image-opening token
    (`break_id`), exactly one image sampled."""
    from megatron_jam.inference.render import decode_images

    layout = generator.layout
    n = layout.format.image_length(generator.grid) - 1  # the image after its opening token (the format's)
    outs = generator.generate([list(p) + [break_id] for p in prompts], params, n, on_step=on_step)
    if any(len(o.ids) < n for o in outs):
        raise RuntimeError("an image was cut short: the prompt plus one image does not fit the context")
    codes = [layout.format.parse([break_id] + o.ids[:n])[0].tolist() if not layout.format.uses_break
             else layout.image_codes(o.ids[:n]).tolist() for o in outs]
    images = decode_images(vq, codes)
    if images is None:
        raise ValueError("the image tokenizer has no decoder: prompt following is scored on decoded pixels")
    return images, codes


def summarise(scorer, rows: list[dict]) -> dict:
    """Per guidance scale: the scorer's summary over that scale's rows, plus the count."""
    out = {}
    for scale in sorted({r["cfg_scale"] for r in rows}):
        mine = [r for r in rows if r["cfg_scale"] == scale]
        out[str(scale)] = {"n": len(mine)} | scorer.summary(mine)
    return out
