"""Generated token ids -> segments -> viewable documents (HTML, Markdown, JSON, PNG images).

Why a module of its own: the generator knows ids, a reader wants a page. An
image segment is drawn with the VQ tokenizer's decoder when it has one
(transformers' `JanusVQVAE.decode`, `Emu3VQVAE.decode` on the image's own grid;
`ChameleonVQVAE` ships only the encoder),
otherwise as a *token-grid visualisation*: one coloured cell per code, laid
out on the latent grid, with a banner saying it is not a decoded image. The
JSON file keeps the raw ids and the segment boundaries, so any image can be
decoded later with the right decoder.
"""

import colorsys
import html
import json
import math
import os

import numpy as np

from megatron_jam.data.vocab import VocabLayout

GRID_LABEL = "token grid (not decoded: no VQ decoder given)"


def segments(ids: list[int], layout: VocabLayout) -> list[dict]:
    """Split ids into text runs, image runs and `<break>` / `<eos>` markers, with [start, end) indices.

    Images come from the layout's image format: in `ours` a run of codes (grid: as square as possible);
    in formats with markers (Emu3) the whole structure, with its grid read from the tokens (the rows
    between end-of-line tokens). Generation that began inside an image (a prompt ending with
    `<|image start|>`) has its first image opened by that prompt token.
    """
    if layout.format.name != "ours":
        return _structured_segments(ids, layout)
    out: list[dict] = []
    for i, tok in enumerate(ids):
        kind = ("image" if layout.is_image(tok) else "break" if tok == layout.break_id
                else "eos" if tok == layout.eos_id else "text")
        if kind in ("break", "eos"):
            out.append({"type": kind, "start": i, "end": i + 1})
        elif out and out[-1]["type"] == kind:
            out[-1]["end"] = i + 1
            out[-1]["ids"].append(tok)
        else:
            out.append({"type": kind, "start": i, "end": i + 1, "ids": [tok]})
    for seg in out:
        if seg["type"] == "image":
            seg["codes"] = [t - layout.image_offset for t in seg.pop("ids")]
            seg["complete"] = len(seg["codes"]) == layout.tokens_per_image
    return out


def _structured_segments(ids: list[int], layout: VocabLayout) -> list[dict]:
    """`segments` for image formats whose images are marker-delimited structures (Emu3)."""
    from megatron_jam.data.image_format import ImageFormatError

    fmt, arr = layout.format, np.asarray(ids, dtype=np.int64)
    bounds, _ = fmt.image_spans(arr)
    out: list[dict] = []
    pos = 0
    for a, b in bounds.tolist() + [[len(ids), len(ids)]]:
        for i in range(pos, a):  # text and <eos> between images
            tok = int(arr[i])
            if tok == layout.eos_id:
                out.append({"type": "eos", "start": i, "end": i + 1})
            elif out and out[-1]["type"] == "text":
                out[-1]["end"] = i + 1
                out[-1]["ids"].append(tok)
            else:
                out.append({"type": "text", "start": i, "end": i + 1, "ids": [tok]})
        if a == b:
            break
        body = arr[a:b] if arr[a] == layout.break_id else np.concatenate([[layout.break_id], arr[a:b]])
        try:
            codes, grid = fmt.parse(body)
            seg = {"codes": codes.tolist(), "grid": list(grid), "complete": True}
        except ImageFormatError:  # cut by the budget
            codes = layout.image_codes(body[layout.is_image(body)]).tolist()
            seg = {"codes": codes, "grid": list(grid_shape(max(1, len(codes)))), "complete": False}
        out.append({"type": "image", "start": a, "end": b} | seg)
        pos = b
    return out


def grid_shape(n: int) -> tuple[int, int]:
    """(rows, cols) of an image's latent grid: square when n is a square, else as square as possible."""
    rows = int(math.isqrt(n))
    while n % rows:
        rows -= 1
    return rows, n // rows


def token_grid_image(codes: list[int], codebook_size: int, cell: int | None = None, grid=None):
    """A PIL image: one colour per code (hue from the code), a labelled banner on top; `grid` (rows, cols)
    when the tokens say it (Emu3), else as square as possible."""
    from PIL import Image, ImageDraw

    rows, cols = grid if grid and grid[0] * grid[1] == len(codes) else grid_shape(max(1, len(codes)))
    cell = cell or max(4, 256 // max(rows, cols))
    colours = np.zeros((rows * cols, 3), dtype=np.uint8)
    for k, c in enumerate(codes):
        hue = (c * 0.618033988749895) % 1.0
        light = 0.35 + 0.3 * ((c * 7919) % codebook_size) / max(1, codebook_size)
        colours[k] = [int(255 * x) for x in colorsys.hls_to_rgb(hue, light, 0.8)]
    grid = np.kron(colours.reshape(rows, cols, 3), np.ones((cell, cell, 1), dtype=np.uint8))
    banner = 14
    width = max(grid.shape[1], 8 * len(GRID_LABEL) // 2)
    canvas = Image.new("RGB", (width, grid.shape[0] + banner), (255, 255, 255))
    canvas.paste(Image.fromarray(grid), (0, banner))
    ImageDraw.Draw(canvas).text((2, 1), GRID_LABEL, fill=(180, 0, 0))
    return canvas


def decode_images(vq, codes: list[list[int]], grids: list | None = None):
    """Decoded PIL images with the tokenizer's decoder, or None when it has no decoder. With `grids`
    (images whose grid is in the tokens, e.g. Emu3's), each image is decoded on its own grid; without,
    on the tokenizer's grid. Each image goes through `VQImageTokenizer.decode_grid`, which knows the
    model's code layout (Emu3: [1, h, w]; Janus: [1, h * w])."""
    if vq is None or not getattr(vq, "has_decoder", hasattr(vq.model, "decode")) or not codes:
        return None
    if grids is None:
        grids = [getattr(vq, "grid", None) or grid_shape(len(c)) for c in codes]
    return [vq.decode_grid(c, g) for c, g in zip(codes, grids)]


def _display_size(seg: dict, target: int = 256) -> str:
    """HTML attributes that show a small image scaled up by an integer factor, without smoothing."""
    w, h = seg.get("size", (0, 0))
    if not w or max(w, h) >= target:
        return ""
    k = max(1, target // max(w, h))
    return f"class='pixels' width='{w * k}' height='{h * k}' "


def _page(title: str, body: str) -> str:
    return (f"<!DOCTYPE html>\n<html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
            "<style>body{font-family:sans-serif;max-width:50em;margin:2em auto}"
            ".prompt{color:#555;border-left:3px solid #999;padding-left:1em}"
            ".retrieved{background:#f3f3f8;border:1px dashed #99a;padding:0 1em;margin-bottom:1em}"
            ".retrieved-doc{border-top:1px solid #ccd}"
            "figure{margin:1em 0}figcaption{font-size:80%;color:#555}"
            "img.pixels{image-rendering:pixelated;image-rendering:crisp-edges}</style></head><body>\n"
            f"{body}\n</body></html>\n")


class DocumentWriter:
    """Writes one prompt's result as NAME.html, NAME.md, NAME.json and NAME_imgK.png under `folder`."""

    def __init__(self, folder: str, layout: VocabLayout, text_tokenizer=None, image_tokenizer=None):
        self.folder, self.layout, self.sp, self.vq = folder, layout, text_tokenizer, image_tokenizer
        os.makedirs(folder, exist_ok=True)

    def text(self, ids: list[int]) -> str:
        if self.sp is not None:
            return self.sp.decode([int(t) for t in ids if self.layout.is_text(t)])
        return " ".join(f"<{t}>" for t in ids)

    def write(self, name: str, prompt: str | None, gen, meta: dict | None = None, retrieved=None) -> dict:
        """Write the three files (and images); returns the JSON record.

        `retrieved` (a `retrieval_context.RetrievedContext`): the bank documents prepended to the prompt.
        `gen.prompt_ids` is then the whole context the model saw; the record keeps it as `context_ids`,
        the prompt's own ids as `prompt_ids`, and each retrieved document rendered like the output."""
        segs = self._render(gen.ids, name)
        prefix = len(retrieved.prefix_ids()) if retrieved is not None else 0
        prompt_ids = gen.prompt_ids[prefix:]
        prompt_text = prompt if prompt is not None else self.text(prompt_ids)
        record = {"name": name, "prompt": prompt_text, "prompt_ids": prompt_ids, "ids": gen.ids,
                  "finish_reason": gen.finish_reason, "segments": segs} | (meta or {})
        if retrieved is not None:
            record |= {"context_ids": gen.prompt_ids, "retrieved": retrieved.record(),
                       "retrieved_documents": [{"id": d.id, "score": d.score,
                                                "segments": self._render(list(d.tokens), f"{name}_ret{j}")}
                                               for j, d in enumerate(retrieved.documents)]}
        with open(os.path.join(self.folder, f"{name}.json"), "w") as f:
            json.dump(record, f, indent=1)
        with open(os.path.join(self.folder, f"{name}.html"), "w") as f:
            f.write(self._html(record))
        with open(os.path.join(self.folder, f"{name}.md"), "w") as f:
            f.write(self._markdown(record))
        return record

    def _render(self, ids: list[int], stem: str) -> list[dict]:
        """Segments of `ids` with their images saved as STEM_imgK.png (decoded, or token grids) and text decoded."""
        segs = segments(ids, self.layout)
        images = [s for s in segs if s["type"] == "image"]
        done = [s for s in images if s["complete"]]
        decoded = decode_images(self.vq, [s["codes"] for s in done], [s["grid"] for s in done]
                                if self.layout.format.name != "ours" else None)
        decoded = iter(decoded) if decoded is not None else None
        for k, seg in enumerate(images):
            seg["file"] = f"{stem}_img{k}.png"
            if decoded is not None and seg["complete"]:
                im, seg["rendering"] = next(decoded), "decoded"
            else:
                im = token_grid_image(seg["codes"], self.layout.codebook_size, grid=seg.get("grid"))
                seg["rendering"] = "token_grid"
            im.save(os.path.join(self.folder, seg["file"]))
            seg["size"] = list(im.size)
        for seg in segs:
            if seg["type"] == "text":
                seg["text"] = self.text(seg["ids"])
        return segs

    def _html(self, rec: dict) -> str:
        return _page(rec["name"], self._body(rec))

    def _body(self, rec: dict) -> str:
        parts = self._retrieved_html(rec)
        parts.append(f"<p class='prompt'><b>Prompt:</b> {html.escape(rec['prompt'])}</p>")
        if rec.get("retrieved_documents") is not None:
            parts.append("<h4 class='output'>Output</h4>")
        parts += self._segments_html(rec["segments"], "generated")
        parts.append(f"<p><small>finish: {html.escape(rec['finish_reason'])}, {len(rec['ids'])} tokens</small></p>")
        return "\n".join(parts)

    def _segments_html(self, segs: list[dict], what: str) -> list[str]:
        parts = []
        for seg in segs:
            if seg["type"] == "text":
                parts.append(f"<p class='text'>{html.escape(seg['text'])}</p>")
            elif seg["type"] == "image":
                caption = ("decoded with the VQ decoder" if seg["rendering"] == "decoded" else GRID_LABEL)
                if not seg["complete"]:
                    caption += f" (incomplete: {len(seg['codes'])} of {self.layout.tokens_per_image} tokens)"
                parts.append(f"<figure><img src='{html.escape(seg['file'])}' {_display_size(seg)}alt='{what} "
                             f"image tokens {seg['start']}-{seg['end']}'><figcaption>{html.escape(caption)}"
                             "</figcaption></figure>")
        return parts

    def _retrieved_html(self, rec: dict) -> list[str]:
        """The retrieved documents, boxed and labelled as context the model saw before the prompt."""
        docs = rec.get("retrieved_documents")
        if docs is None:
            return []
        parts = [f"<section class='retrieved'><h4>Retrieved documents: what the model saw before the prompt "
                 f"({len(docs)}, prepended in this order)</h4>"]
        if not docs:
            parts.append("<p><i>none (no candidate passed the filters or fitted the context)</i></p>")
        for d in docs:
            parts.append(f"<div class='retrieved-doc'><p><small>bank document {d['id']}, score {d['score']:.3f}"
                         "</small></p>")
            parts += self._segments_html(d["segments"], "retrieved")
            parts.append("</div>")
        parts.append("</section>")
        return parts

    def write_index(self, records: list[dict], title: str = "generated documents") -> str:
        """index.html: every document of this run on one page, in order; returns its path."""
        body = "\n".join(f"<section><h2>{html.escape(r['name'])}</h2>\n{self._body(r)}</section>" for r in records)
        path = os.path.join(self.folder, "index.html")
        with open(path, "w") as f:
            f.write(_page(title, body))
        return path

    def _markdown(self, rec: dict) -> str:
        lines = [f"# {rec['name']}", ""]
        for d in rec.get("retrieved_documents") or []:
            lines += [f"> **Retrieved** (bank document {d['id']}, score {d['score']:.3f}; seen before the prompt): "
                      + " ".join(s["text"] if s["type"] == "text" else f"![retrieved image]({s['file']})"
                                 for s in d["segments"] if s["type"] in ("text", "image")), ""]
        lines += [f"> **Prompt:** {rec['prompt']}", ""]
        for seg in rec["segments"]:
            if seg["type"] == "text":
                lines += [seg["text"], ""]
            elif seg["type"] == "image":
                label = "image" if seg["rendering"] == "decoded" else GRID_LABEL
                lines += [f"![{label}]({seg['file']})", ""]
        lines.append(f"_finish: {rec['finish_reason']}, {len(rec['ids'])} tokens_")
        return "\n".join(lines) + "\n"
