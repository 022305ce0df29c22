"""tools/train_image_tokenizer.py and megatron_jam.data.vq_training: a tiny run on flat-shape PNGs drawn
with Pillow lowers held-out reconstruction error; the saved folder loads with VQImageTokenizer at the
configured codebook size, tokens per image and resolution, and its codes decode back to images of that
size; the project's encoder picks exactly the codes training used; bad input is a one-line error (exit 2)."""

import json
import random
import types

import pytest

from tool_loader import load_tool

SIZE, TOKENS, CODEBOOK = 16, 16, 16
COLOURS = [(220, 20, 20), (30, 60, 220), (0, 128, 0), (240, 210, 0), (128, 0, 128), (255, 140, 0)]


def _tool():
    return load_tool("train_image_tokenizer")


def shape_image(rng: random.Random, size: int = SIZE):
    """A flat circle, square or triangle in one colour on white, jittered in size and position."""
    from PIL import Image, ImageDraw

    image = Image.new("RGB", (size, size), (255, 255, 255))
    draw = ImageDraw.Draw(image)
    side = rng.uniform(0.45, 0.8) * size
    x, y = rng.uniform(0, size - side), rng.uniform(0, size - side)
    colour, kind = rng.choice(COLOURS), rng.choice(["circle", "square", "triangle"])
    if kind == "circle":
        draw.ellipse([x, y, x + side, y + side], fill=colour)
    elif kind == "square":
        draw.rectangle([x, y, x + side, y + side], fill=colour)
    else:
        draw.polygon([(x + side / 2, y), (x, y + side), (x + side, y + side)], fill=colour)
    return image


def _train_args(inputs, save, *extra):
    return ["--input", *inputs, "--save", str(save), "--image-size", str(SIZE), "--tokens-per-image", str(TOKENS),
            "--codebook-size", str(CODEBOOK), "--train-iters", "25", "--micro-batch-size", "8",
            "--num-eval-images", "6", "--log-interval", "0", "--seed", "3", *extra]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """30 shapes referenced from a JSONL (plus one missing image and one malformed line), trained briefly."""
    root = tmp_path_factory.mktemp("vqtrain")
    (root / "images").mkdir()
    rng = random.Random(0)
    lines = []
    for i in range(30):
        shape_image(rng).save(root / "images" / f"{i}.png")
        lines.append(json.dumps({"content": [{"text": f"shape {i}"}, {"image": f"images/{i}.png"}]}))
    lines += [json.dumps({"content": [{"image": "images/missing.png"}]}), "{not json"]
    (root / "docs.jsonl").write_text("\n".join(lines) + "\n")
    tool = _tool()
    assert tool.main(_train_args([str(root / "docs.jsonl")], root / "vq")) == 0
    return root, json.loads((root / "vq" / "training_summary.json").read_text())


def test_tiny_run_reduces_heldout_error(trained):
    _, summary = trained
    assert summary["eval_mse_after"] < 0.8 * summary["eval_mse_before"]
    assert summary["train_images"] == 24 and summary["eval_images"] == 6
    assert summary["skipped"] == {"unreadable_images": 1, "malformed_lines": 1}
    assert 1 <= summary["codes_used"] <= CODEBOOK


def test_saved_folder_loads_and_round_trips(trained):
    import torch

    from megatron_jam.data.image_tokenizer import VQImageTokenizer, load_image
    from megatron_jam.data.vq_training import encode_latents, pixels_from_images, quantize

    root, _ = trained
    assert json.loads((root / "vq" / "config.json").read_text())["resolution"] == SIZE
    vq = VQImageTokenizer(str(root / "vq"))
    assert (vq.codebook_size, vq.tokens_per_image, vq.resolution) == (CODEBOOK, TOKENS, SIZE)
    paths = [str(root / "images" / f"{i}.png") for i in range(4)]
    codes = vq.encode_files(paths)
    assert codes.shape == (4, TOKENS) and codes.min() >= 0 and codes.max() < CODEBOOK
    with torch.no_grad():
        decoded = vq.model.decode(torch.from_numpy(codes))
        pixels = pixels_from_images([load_image(p) for p in paths], SIZE)
        _, trained_codes = quantize(vq.model, encode_latents(vq.model, pixels))
    assert tuple(decoded.shape) == (4, 3, SIZE, SIZE)
    assert (trained_codes.reshape(4, -1).numpy() == codes).all()  # same preprocessing, same code choice


def test_resolution_derived_when_config_lacks_it(tmp_path):
    from transformers import JanusVQVAE, JanusVQVAEConfig

    from megatron_jam.data.image_tokenizer import VQImageTokenizer, _config_resolution

    JanusVQVAE(JanusVQVAEConfig(embed_dim=8, num_embeddings=16, latent_channels=8, base_channels=32,
                                channel_multiplier=[1, 1, 2], num_res_blocks=1, num_patches=4)
               ).save_pretrained(tmp_path / "janus")
    assert "resolution" not in json.loads((tmp_path / "janus" / "config.json").read_text())
    vq = VQImageTokenizer(str(tmp_path / "janus"))
    assert (vq.resolution, vq.tokens_per_image) == (16, 16)
    with pytest.raises(ValueError, match="somewhere/vq"):
        _config_resolution(types.SimpleNamespace(), "somewhere/vq")


def test_tokens_per_image_must_fit_the_image():
    from megatron_jam.data.vq_training import latent_side

    assert latent_side(32, 16) == 4 and latent_side(32, 64) == 8
    for bad in (15, 36, 0):
        with pytest.raises(ValueError, match="tokens-per-image"):
            latent_side(32, bad)


def test_bad_input_is_one_line_error(tmp_path, capsys):
    tool = _tool()
    (tmp_path / "empty").mkdir()
    corrupt = tmp_path / "corrupt.png"
    corrupt.write_bytes(b"not a png at all")
    (tmp_path / "gone.jsonl").write_text(json.dumps({"content": [{"image": "nope.png"}]}) + "\n")
    cases = [(str(tmp_path / "empty"), "no image files"), (str(corrupt), "corrupt_image"),
             (str(tmp_path / "gone.jsonl"), "no usable images"), (str(tmp_path / "absent.png"), "no such file")]
    for spec, reason in cases:
        assert tool.main(_train_args([spec], tmp_path / "out")) == 2
        err = capsys.readouterr().err.strip()
        assert "\n" not in err and err.startswith("error: ") and spec in err and reason in err, err
    assert not (tmp_path / "out").exists()


def test_training_is_deterministic():
    import torch

    from megatron_jam.data import vq_training

    rng = random.Random(1)
    pixels = vq_training.pixels_from_images([shape_image(rng) for _ in range(12)], SIZE)
    states, summaries = [], []
    for _ in range(2):
        model = vq_training.build_model(SIZE, TOKENS, CODEBOOK, seed=5)
        summaries.append(vq_training.train(model, pixels[:8], pixels[8:], train_iters=6, micro_batch_size=4,
                                           seed=5, restart_interval=2))
        states.append(model.state_dict())
    assert summaries[0]["eval_mse_after"] == summaries[1]["eval_mse_after"]
    assert all(torch.equal(states[0][k], states[1][k]) for k in states[0])
