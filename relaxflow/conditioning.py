"""Condition tokens for the generator: images through DINOv2 with registers, text through CLIP.

Image path (TRELLIS's): the object's alpha (the image's own, or a user mask) gives a box
(alpha > 0.8), a square 1.2 times its longer side around its centre is cut out (transparent
outside the image), resized to 518 px and premultiplied onto black (framing ``"object"``;
framing ``"frame"`` keeps the image's own framing, padded to a square, for generators trained on
renders from a fixed camera, where an object's size in the picture says its size in the grid:
see :data:`FRAMINGS`); ImageNet normalisation;
all DINOv2 tokens (class, registers, 37 x 37 patches) from the last layer *before* the model's
final norm, then a layer norm without affine. The negative condition is all zeros.

Text path: CLIP's 77-token last hidden state; the negative is the empty prompt's.
Both models load offline with ``transformers`` from a local folder or the Hugging Face cache;
their ids are settings.
"""

from __future__ import annotations

import os
from typing import Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from core.errors import InputFileError, UserError
from guidance.loading import resolve_model_path

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
IMAGE_SIZE = 518


class ImageFileError(UserError):
    """An input image file that cannot be read (a folder, not an image, damaged, cut short);
    the message names the file, the setting it was given as and the fix."""


def _read_image(path: Union[str, os.PathLike], mode: str, setting: str) -> np.ndarray:
    """``path``'s pixels in PIL ``mode``; errors name the file and ``setting`` (``image``,
    ``mask``, ``priors``), the option it was given as."""
    from PIL import Image, UnidentifiedImageError

    given = f"(given as {setting}=)"
    if os.path.isdir(path):
        raise ImageFileError(f"image {path} {given} is a folder, not an image file: give the "
                             f"path of a PNG or JPEG file as {setting}=")
    try:
        with Image.open(path) as img:
            return np.asarray(img.convert(mode))
    except FileNotFoundError:
        raise InputFileError(f"image {path} does not exist {given}: check the path") from None
    except UnidentifiedImageError:
        raise ImageFileError(f"{path} is not an image file PIL can read {given}: give a PNG or "
                             f"JPEG file as {setting}=") from None
    except OSError as err:
        if err.errno is not None:  # the system's: permissions, an I/O error
            raise ImageFileError(f"image {path} {given} cannot be read "
                                 f"({err.strerror or err})") from None
        # PIL's own, for data that ends early ("image file is truncated") or does not decode
        problem = str(err) or type(err).__name__
        raise ImageFileError(f"image {path} {given} is damaged or cut short ({problem}): save "
                             f"or copy it again, or give another image as {setting}=") from None
    except (SyntaxError, EOFError, ValueError) as err:  # PIL's for broken chunks, odd modes
        problem = str(err) or type(err).__name__
        raise ImageFileError(f"image {path} {given} is damaged or in a form PIL cannot decode "
                             f"({problem}): save it again as PNG, or give another image as "
                             f"{setting}=") from None


def load_rgba(path: Union[str, os.PathLike], mask: Optional[Union[str, os.PathLike]] = None,
              setting: str = "image") -> np.ndarray:
    """``[H, W, 4]`` uint8 from an image file, alpha from ``mask`` (white = object) when given.
    ``setting``: the option ``path`` was given as (``mask`` is ``mask=``), for the errors."""
    rgba = _read_image(path, "RGBA", setting).copy()
    if mask is not None:
        alpha = _read_image(mask, "L", "mask")
        if alpha.shape != rgba.shape[:2]:
            raise UserError(f"mask {mask} is {alpha.shape[1]}x{alpha.shape[0]}, the image "
                            f"{rgba.shape[1]}x{rgba.shape[0]}: they must match")
        rgba[..., 3] = alpha
    return rgba


MASK_FIX = "give an RGBA image or a mask (mask=path.png, white = object)"

# How an image is cut before the conditioner sees it; a pipeline's ``pipeline.json`` says which
# its models were trained on (``image_framing``, absent: ``"object"``).
# "object": TRELLIS's, a square around the object's box: what a released pipeline expects, its
#   objects normalised to the unit cube, so the crop loses nothing.
# "frame": the whole image, padded to a square, for a generator trained on renders from a fixed
#   camera whose shapes keep their size in the grid (the shape world's): there the crop throws
#   away the object's size (a ridge regression reads the structure latent from the uncut image
#   at held-out R^2 0.46, from the crop at 0.33). The embedded generator keeps "object": flows
#   trained on framed renders were no better (BENCHMARKS.md, seventeenth session).
FRAMINGS = ("object", "frame")


def _square_box(alpha: np.ndarray, framing: str) -> Tuple[int, int, int, int]:
    """The square ``(left, top, right, bottom)`` cut from an image with alpha ``[H, W]``."""
    if framing == "frame":
        h, w = alpha.shape
        side = max(h, w)
        left, top = (w - side) // 2, (h - side) // 2
        return left, top, left + side, top + side
    ys, xs = np.nonzero(alpha > 0.8 * 255)
    cx, cy = (xs.min() + xs.max()) / 2, (ys.min() + ys.max()) / 2
    half = int(1.2 * max(xs.max() - xs.min(), ys.max() - ys.min())) // 2  # TRELLIS's rounding
    return tuple(int(round(v)) for v in (cx - half, cy - half, cx + half, cy + half))


def preprocess_image(rgba: np.ndarray, size: int = IMAGE_SIZE, source: str = "the image",
                     opaque_fix: str = MASK_FIX, framing: str = "object") -> Tensor:
    """``[H, W, 4]`` uint8 RGBA -> ``[3, size, size]`` float in [0, 1], premultiplied by alpha
    (black background); cut by ``framing`` (:data:`FRAMINGS`): the object centred with a 20%
    margin, or the whole image. Errors name ``source`` and, for an image without transparency,
    give ``opaque_fix``."""
    from PIL import Image

    if rgba.ndim != 3 or rgba.shape[2] != 4:
        raise ValueError(f"expected an RGBA image [H, W, 4], got shape {rgba.shape}")
    alpha = rgba[..., 3]
    if alpha.min() == 255:
        raise UserError(f"{source} has no transparency to tell the object from its "
                        f"background: {opaque_fix}")
    if not (alpha > 0.8 * 255).any():
        raise UserError(f"no object found in {source}: no pixel has alpha above 0.8")
    crop = Image.fromarray(rgba, "RGBA").crop(_square_box(alpha, framing))
    crop = crop.resize((size, size), Image.LANCZOS)
    pixels = np.asarray(crop).astype(np.float32) / 255.0
    # premultiplied, then back to 8 bits by truncation: the images the released models saw
    premultiplied = (pixels[..., :3] * pixels[..., 3:] * 255).astype(np.uint8)
    return torch.from_numpy(premultiplied.astype(np.float32) / 255.0).permute(2, 0, 1)


def load_object(path: Union[str, os.PathLike], mask: Optional[Union[str, os.PathLike]] = None,
                opaque_fix: str = MASK_FIX, setting: str = "image",
                framing: str = "object") -> Tensor:
    """An image file's object, preprocessed: ``[3, S, S]``. The alpha is the image's own or
    ``mask``'s (white = object); errors name the file the problem is in, the setting it was
    given as (``setting``: ``image``, or ``priors`` for a prior image; ``mask``) and the fix
    (``opaque_fix``: for an image without transparency and without a mask). ``framing``: the
    pipeline's (:data:`FRAMINGS`)."""
    rgba = load_rgba(path, mask, setting)
    if mask is None:
        return preprocess_image(rgba, source=f"image {path}", opaque_fix=opaque_fix,
                                framing=framing)
    if rgba[..., 3].min() == 255:
        raise UserError(f"mask {mask} is white everywhere, so nothing in {path} is background: "
                        "paint the object's visible pixels white and everything else black")
    return preprocess_image(rgba, source=f"image {path} with mask {mask}", framing=framing)


class ImageConditioner:
    """DINOv2 with registers (``facebook/dinov2-with-registers-large`` by default)."""

    def __init__(self, model, device: Union[str, torch.device] = "cpu"):
        self.model = model.to(device).eval()
        self.device = torch.device(device)

    @classmethod
    def from_pretrained(cls, model_id: str = "facebook/dinov2-with-registers-large",
                        device: Union[str, torch.device] = "cpu",
                        option: str = "image_cond_model") -> "ImageConditioner":
        from transformers import Dinov2WithRegistersModel

        folder = resolve_model_path(model_id, index_file="config.json", option=option)
        return cls(Dinov2WithRegistersModel.from_pretrained(folder, local_files_only=True), device)

    def token_layout(self) -> Tuple[int, Tuple[int, int]]:
        """How its tokens of one image are laid out: ``(prefix, grid)``, the class and register
        tokens, then the patch grid (the released ViT-L/14 with 4 registers at 518 px: 5 and
        37 x 37)."""
        config = self.model.config
        side = IMAGE_SIZE // config.patch_size
        return 1 + config.num_register_tokens, (side, side)

    def embed(self, images: Tensor) -> Tensor:
        """``[B, 3, S, S]`` premultiplied images in [0, 1] -> the model's input embeddings
        ``[B, 1 + R + P, C]`` (class, register and patch tokens with their positions), after
        ImageNet normalisation."""
        x = images.to(self.device, torch.float32)
        mean = x.new_tensor(IMAGENET_MEAN)[:, None, None]
        std = x.new_tensor(IMAGENET_STD)[:, None, None]
        return self.model.embeddings((x - mean) / std)

    def encode(self, embeddings: Tensor) -> Tensor:
        """Input embeddings ``[B, T, C]`` (:meth:`embed`) -> condition tokens ``[B, T, C]``:
        the last layer's output, before the model's final layernorm, then a layer norm without
        affine. Differentiable: training the generator's conditioner goes through here."""
        tokens = self.model.encoder(embeddings).last_hidden_state
        return F.layer_norm(tokens, tokens.shape[-1:])

    @torch.no_grad()
    def __call__(self, images: Tensor) -> Tensor:
        """``[B, 3, S, S]`` premultiplied images in [0, 1] -> tokens ``[B, 1 + R + P, C]``."""
        return self.encode(self.embed(images))

    @staticmethod
    def negative(tokens: Tensor) -> Tensor:
        return torch.zeros_like(tokens)


class TextConditioner:
    """CLIP text encoder (``openai/clip-vit-large-patch14`` by default)."""

    def __init__(self, model, tokenizer, device: Union[str, torch.device] = "cpu"):
        self.model = model.to(device).eval()
        self.tokenizer = tokenizer
        self.device = torch.device(device)

    @classmethod
    def from_pretrained(cls, model_id: str = "openai/clip-vit-large-patch14",
                        device: Union[str, torch.device] = "cpu",
                        option: str = "text_cond_model") -> "TextConditioner":
        from transformers import AutoTokenizer, CLIPTextModel

        folder = resolve_model_path(model_id, index_file="config.json", option=option)
        return cls(CLIPTextModel.from_pretrained(folder, local_files_only=True),
                   AutoTokenizer.from_pretrained(folder, local_files_only=True), device)

    @torch.no_grad()
    def __call__(self, texts: Sequence[str]) -> Tensor:
        """Prompts -> ``[B, 77, C]`` last hidden states."""
        ids = self.tokenizer(list(texts), max_length=77, padding="max_length", truncation=True,
                             return_tensors="pt").input_ids.to(self.device)
        return self.model(input_ids=ids).last_hidden_state

    def negative(self, tokens: Tensor) -> Tensor:
        return self([""]).expand_as(tokens)
