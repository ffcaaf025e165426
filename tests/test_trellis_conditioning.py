"""Condition tokens: image preprocessing against hand-built images, DINOv2 and CLIP through
transformers with tiny models saved by the tests and loaded offline."""

import numpy as np
import pytest
import torch

from guidance.loading import ModelWeightsNotFound
from relaxflow.conditioning import ImageConditioner, TextConditioner, load_rgba, preprocess_image
from tests.tiny_models import build_tiny_clip_text, build_tiny_dinov2


def square_object(size=100, box=(30, 40, 50, 80), colour=(255, 0, 0)):
    """RGBA image, transparent but for an opaque rectangle (x0, y0, x1, y1)."""
    rgba = np.zeros((size, size, 4), dtype=np.uint8)
    x0, y0, x1, y1 = box
    rgba[y0:y1, x0:x1, :3] = colour
    rgba[y0:y1, x0:x1, 3] = 255
    return rgba


def test_preprocessing_centres_the_object_with_a_margin_on_black():
    image = preprocess_image(square_object(), size=120)
    assert image.shape == (3, 120, 120)
    # the object's longer side fills about 1 / 1.2 of the crop: ~100 of 120 rows, centred
    rows = torch.nonzero(image[0].amax(1) > 0.5).squeeze(1)
    assert 98 <= int(rows.max()) - int(rows.min()) + 1 <= 105
    assert abs((int(rows.min()) + int(rows.max())) / 2 - 59.5) <= 3  # whole-pixel crop box
    cols = torch.nonzero(image[0].amax(0) > 0.5).squeeze(1)
    assert abs((int(cols.min()) + int(cols.max())) / 2 - 59.5) <= 3  # centred
    assert image[:, :5, :5].abs().max() == 0  # premultiplied: black outside the object
    assert image[1:].max() < 0.05  # red stays red


def test_the_frame_framing_keeps_the_objects_size_and_place():
    """framing="frame" cuts nothing: the object stays where it was, at its size, and an image
    that is not square is padded (transparent, so black) to one around its centre."""
    image = preprocess_image(square_object(), size=100, framing="frame")
    rows = torch.nonzero(image[0].amax(1) > 0.5).squeeze(1)
    cols = torch.nonzero(image[0].amax(0) > 0.5).squeeze(1)
    assert (int(rows.min()), int(rows.max()), int(cols.min()), int(cols.max())) == (40, 79, 30, 49)
    wide = np.zeros((50, 100, 4), dtype=np.uint8)
    wide[10:20, 60:70] = (255, 0, 0, 255)
    image = preprocess_image(wide, size=100, framing="frame")
    rows = torch.nonzero(image[0].amax(1) > 0.5).squeeze(1)
    assert (int(rows.min()), int(rows.max())) == (35, 44)  # 25 rows of padding above
    assert image[:, :25].abs().max() == 0 and image[:, 75:].abs().max() == 0
    # the object's own crop of the same image is unchanged by the new setting's default
    assert torch.equal(preprocess_image(wide, size=100),
                       preprocess_image(wide, size=100, framing="object"))


def test_bad_images_get_clear_errors(tmp_path):
    from PIL import Image

    with pytest.raises(ValueError, match="no transparency"):
        preprocess_image(np.full((10, 10, 4), 255, dtype=np.uint8))
    empty = square_object()
    empty[..., 3] = 100  # translucent everywhere: nothing above 0.8
    with pytest.raises(ValueError, match="no object found"):
        preprocess_image(empty)
    (tmp_path / "notes.png").write_text("not an image")
    with pytest.raises(ValueError, match="not an image file"):
        load_rgba(tmp_path / "notes.png")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_rgba(tmp_path / "missing.png")
    Image.fromarray(np.zeros((20, 30, 3), dtype=np.uint8)).save(tmp_path / "rgb.png")
    Image.fromarray(np.zeros((20, 20), dtype=np.uint8)).save(tmp_path / "mask.png")
    with pytest.raises(ValueError, match="must match"):
        load_rgba(tmp_path / "rgb.png", tmp_path / "mask.png")


def test_a_mask_gives_an_rgb_image_its_object(tmp_path):
    from PIL import Image

    rgba = square_object()
    Image.fromarray(rgba[..., :3]).save(tmp_path / "photo.png")
    Image.fromarray(rgba[..., 3]).save(tmp_path / "mask.png")
    masked = load_rgba(tmp_path / "photo.png", tmp_path / "mask.png")
    assert torch.allclose(preprocess_image(masked), preprocess_image(rgba))


def test_dinov2_tokens_are_every_token_before_the_final_norm_then_normalised(tmp_path):
    from PIL import Image

    folder = build_tiny_dinov2(tmp_path / "dinov2")
    conditioner = ImageConditioner.from_pretrained(str(folder))
    Image.fromarray(square_object()).save(tmp_path / "object.png")
    tokens = conditioner(preprocess_image(load_rgba(tmp_path / "object.png"))[None])
    assert tokens.shape == (1, 1 + 4 + 37 * 37, 32)
    assert torch.allclose(tokens.mean(-1), torch.zeros(1, 1374), atol=1e-5)
    assert torch.allclose(tokens.std(-1, unbiased=False), torch.ones(1, 1374), atol=0.02)
    out = conditioner.model(pixel_values=torch.zeros(1, 3, 518, 518), output_hidden_states=True)
    assert not torch.allclose(out.hidden_states[-1], out.last_hidden_state)  # before the norm
    assert torch.equal(conditioner.negative(tokens), torch.zeros_like(tokens))


def test_the_token_layout_is_the_models_own(tmp_path):
    """Class + registers, then the patch grid: what RelaxFlow's key blur reads (the released
    model's 5 + 37 x 37; the embedded generator's conditioner has 37 px patches, 14 x 14)."""
    from transformers import Dinov2WithRegistersConfig, Dinov2WithRegistersModel

    released_like = ImageConditioner.from_pretrained(str(build_tiny_dinov2(tmp_path / "a")))
    assert released_like.token_layout() == (5, (37, 37))
    config = Dinov2WithRegistersConfig(hidden_size=16, num_hidden_layers=1,
                                       num_attention_heads=2, intermediate_size=32,
                                       patch_size=37, image_size=518, num_register_tokens=2)
    coarse = ImageConditioner(Dinov2WithRegistersModel(config))
    prefix, grid = coarse.token_layout()
    assert (prefix, grid) == (3, (14, 14))
    assert coarse(torch.zeros(1, 3, 518, 518)).shape[1] == prefix + grid[0] * grid[1]


def test_clip_tokens_and_the_empty_prompt_negative(tmp_path):
    conditioner = TextConditioner.from_pretrained(str(build_tiny_clip_text(tmp_path / "clip")))
    tokens = conditioner(["a red chair", "a lamp"])
    assert tokens.shape == (2, 77, 32)
    negative = conditioner.negative(tokens)
    assert negative.shape == tokens.shape and torch.equal(negative[0], negative[1])
    assert torch.allclose(negative[:1], conditioner([""]))


def test_absent_condition_models_name_the_setting(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-hub"))
    with pytest.raises(ModelWeightsNotFound, match="image_cond_model=<folder>"):
        ImageConditioner.from_pretrained("facebook/dinov2-with-registers-large")
