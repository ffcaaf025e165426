"""The embedded default prior: the exact optimal denoiser of a finite image set.

For data ``X_1..X_N`` (images scaled to [-1, 1]) and ``x_t = a x_0 + s eps``, the minimum-MSE
denoiser is ``x0_hat(x_t) = sum_i softmax_i(-|x_t - a X_i|^2 / (2 s^2)) X_i``. It is a genuine
diffusion model of that data, needs no training and no download, and runs on a CPU. Conditioning
restricts the sum: a prompt to its images, a view suffix (", front view", ...) further to the
images whose camera falls in that direction; the empty prompt is unconditional (all images).

It memorises: at small t the softmax is one-hot, so it rebuilds only its own objects. It is the
engine's test bed, not a text-to-3D prior for new prompts.

Backgrounds: with the images' opacity ``O_i``, a condition may carry ``background [B,3]``, the
colour each render was composited on; every image is then re-composited on that colour,
``X_i(b) = X_i + (1 - O_i) (b - b_data)``. The distances and the weighted sum are expanded in
``b`` so no re-composited copy of the data is ever formed.

Numerics: logits are formed in float64 (their spread grows like 1/s^2, so float32 distances are
not enough near t = 0). A call makes two passes over a condition's images, a chunk of
``chunk_size`` at a time (gathered when the condition ranges over part of the data, so a prompt's
query costs in proportion to its own images and the unconditional one, classifier-free
guidance's other half, in proportion to all N): the first scores every image (the softmax
needs them all), the second sums the images weighted, leaving out those whose weight is
negligible in every row (all of them together under ``NEGLIGIBLE_WEIGHT`` of the largest, below
float64's rounding of the result). Over thousands of 12,288-dimensional images the softmax is
peaked for any t below about 0.8, so the second pass reads a few per cent of the data there and
a call costs 0.38-0.46 of what summing every image does (0.64-0.70 averaged over t;
``benchmarks/bench_prior_call.py``, BENCHMARKS.md, twentieth session).
Temporaries are a chunk of images and a ``[B, N]`` float64 score per condition. The data itself
is held once, in float64: 24 bytes a pixel of colour and 8 of transparency, so the default
dataset's 6120 images of 64x64 take 0.80 GB (0.60 colour, 0.20 transparency). It is converted a
chunk at a time, so building the prior needs little more than that on top of its float32 inputs
(1.6 GB at the peak, loading included; 4.1 GB for 1200 views an object).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import List, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor

from core.errors import InputFileError, UserError

from .base import Condition, Guidance
from .prompts import PromptConfig, view_directions
from .schedules import CosineSchedule

UNCONDITIONAL = -1
# Summed, the weights a posterior mean leaves out stay under this fraction of the largest one,
# so the result moves by less than float64's rounding (2^-52).
NEGLIGIBLE_WEIGHT = 2.0 ** -60


class ClosedFormPrior(Guidance):
    """Closed-form diffusion prior over labelled images (pixel space, cosine schedule).

    Args:
        images: ``[N,H,W,3]`` in [0,1].
        prompt_index: ``[N]`` index into ``prompts`` for each image.
        elevation, azimuth: ``[N]`` degrees, the camera of each image (for view conditioning).
        prompts: the prompt texts.
        opacity: ``[N,H,W,1]`` in [0,1] (the renders' alpha channel), optional: needed for
            conditions with a ``background``.
        data_background: the grey level the images were composited on.
    """

    prediction_type = "sample"

    def __init__(self, images: Tensor, prompt_index: Tensor, elevation: Tensor, azimuth: Tensor,
                 prompts: Sequence[str], guidance_scale: float = 1.0,
                 weighting: str = "sigma_over_alpha", device="cpu", chunk_size: int = 1024,
                 model_id: str = "embedded", view_config: Optional[PromptConfig] = None,
                 opacity: Optional[Tensor] = None, data_background: float = 0.5):
        super().__init__(guidance_scale, weighting)
        if isinstance(chunk_size, bool) or int(chunk_size) != chunk_size or chunk_size < 1:
            raise UserError(f"chunk_size (images per streamed chunk) must be a whole number "
                            f">= 1, got {chunk_size!r}")
        self.device = torch.device(device)
        self.schedule = CosineSchedule()
        self.model_id = model_id
        self.prompts = list(prompts)
        self.resolution = images.shape[1]
        if images.shape[1] != images.shape[2]:
            raise ValueError(f"dataset images must be square, got {tuple(images.shape[1:3])}")
        self.chunk_size = int(chunk_size)
        # float64 once, so each call streams the data without conversions. Rows are flattened
        # channels-first, the layout ``encode`` produces. Converted a chunk at a time, so building
        # holds no float64 temporary of the whole data.
        n, pixels = images.shape[0], images.shape[1] * images.shape[2]
        self.data = torch.empty(n, 3 * pixels, dtype=torch.float64, device=self.device)
        self.sq_norms = torch.empty(n, dtype=torch.float64, device=self.device)
        self.data_background = data_background
        self.transparency: Optional[Tensor] = None  # [N, H*W], 1 - opacity
        if opacity is not None:
            self.transparency = torch.empty(n, pixels, dtype=torch.float64, device=self.device)
            self.data_dot_transparency = torch.empty(n, 3, dtype=torch.float64,
                                                     device=self.device)
            self.transparency_sq = torch.empty(n, dtype=torch.float64, device=self.device)
        for start in range(0, n, self.chunk_size):
            rows = slice(start, start + self.chunk_size)
            chw = images[rows].permute(0, 3, 1, 2).reshape(-1, 3 * pixels)
            data = self.data[rows]
            data.copy_(chw.to(self.device, torch.float64) * 2 - 1)
            self.sq_norms[rows] = (data ** 2).sum(-1)
            if opacity is not None:
                transparency = self.transparency[rows]
                transparency.copy_(1 - opacity[rows].reshape(-1, pixels).to(self.device,
                                                                            torch.float64))
                self.data_dot_transparency[rows] = (
                    data.view(-1, 3, pixels) * transparency[:, None]).sum(-1)
                self.transparency_sq[rows] = (transparency ** 2).sum(-1)
        self.prompt_index = prompt_index.long().to(self.device)
        self.direction = view_directions(elevation, azimuth, view_config or PromptConfig()).to(
            self.device)
        # Longest first, so ", left side view" is not read as ", side view".
        self._suffixes = sorted(((s, i) for i, s in enumerate(
            (view_config or PromptConfig()).suffixes())), key=lambda item: -len(item[0]))

    @classmethod
    def from_pretrained(cls, folder, device="cpu", **kwargs) -> "ClosedFormPrior":
        """Load a dataset folder written by ``cfd.shapes.build_shape_dataset``."""
        from safetensors.torch import load_file

        folder = Path(folder)
        if not (folder / "meta.json").is_file():
            raise InputFileError(
                f"no embedded-prior dataset in {folder} (meta.json missing); it is built "
                "automatically by the main job, or with cfd.shapes.build_shape_dataset")
        meta = json.loads((folder / "meta.json").read_text())
        t = load_file(str(folder / "images.safetensors"))
        return cls(t["rgb"].float().div_(255.0), t["prompt_index"], t["elevation"], t["azimuth"],
                   meta["prompts"], device=device, model_id=f"embedded:{meta['fingerprint']}",
                   opacity=t["alpha"].float().div_(255.0),
                   data_background=float(meta["settings"]["background"]), **kwargs)

    # -- Guidance interface -------------------------------------------------------------------
    def latent_shape(self, height: int, width: int) -> Tuple[int, int, int]:
        return (3, self.resolution, self.resolution)

    def encode(self, rgb: Tensor) -> Tensor:
        """``[B,H,W,3]`` in [0,1] -> ``[B,3,R,R]`` in [-1,1], area-resized to the data size R."""
        x = rgb.permute(0, 3, 1, 2)
        if x.shape[-2:] != (self.resolution, self.resolution):
            x = F.interpolate(x, size=(self.resolution, self.resolution), mode="area")
        return x * 2 - 1

    def decode(self, latents: Tensor) -> Tensor:
        return ((latents.clamp(-1, 1) + 1) / 2).permute(0, 2, 3, 1)

    def text_fingerprint(self) -> str:
        return f"{self.model_id}|{'|'.join(self.prompts)}"

    def parse(self, text: str) -> Tuple[int, int]:
        """``"a mug, side view"`` -> (prompt index, direction index); -1 means "any"."""
        direction = UNCONDITIONAL
        for suffix, index in self._suffixes:
            if suffix and text.endswith(suffix):
                text, direction = text[: -len(suffix)], index
                break
        if text.strip() == "":
            return UNCONDITIONAL, direction
        if text not in self.prompts:
            known = "\n  ".join(self.prompts)
            raise UserError(f"unknown prompt {text!r} for the embedded prior; it knows:\n  {known}")
        return self.prompts.index(text), direction

    def encode_text(self, texts: List[str]) -> Condition:
        parsed = [self.parse(t) for t in texts]
        return {"prompt": torch.tensor([p for p, _ in parsed], device=self.device),
                "direction": torch.tensor([d for _, d in parsed], device=self.device)}

    def subset_mask(self, prompt: int, direction: int) -> Tensor:
        """Boolean ``[N]`` of the images a condition ranges over (all of the prompt's images when
        none of them falls in the direction)."""
        mask = torch.ones_like(self.prompt_index, dtype=torch.bool)
        if prompt != UNCONDITIONAL:
            mask &= self.prompt_index == prompt
        if direction != UNCONDITIONAL and (mask & (self.direction == direction)).any():
            mask &= self.direction == direction
        return mask

    @torch.no_grad()
    def model_output(self, x_t: Tensor, t: Tensor, cond: Condition) -> Tensor:
        """``x0_hat`` per item, each over its condition's images (re-composited on the item's
        ``cond["background"]`` when given); at ``t = 0`` (no noise) the softmax's limit, the
        nearest image (ties averaged). ``x_t [B,3,R,R]``, ``t [B]`` -> ``[B,3,R,R]``."""
        B = x_t.shape[0]
        flat = x_t.reshape(B, -1).double()
        a = self.schedule.alpha(t).to(flat)[:, None]
        # At s = 0 the softmax's limit is 1 at the maximum and 0 elsewhere: the smallest
        # positive s^2 gives exactly that for score gaps <= 0, where s^2 = 0 would give 0/0.
        s2 = (self.schedule.sigma(t).to(flat)[:, None] ** 2).clamp_min(torch.finfo(flat.dtype).tiny)

        shift = self._background_shift(cond, B, flat)  # [B,3] or None
        out = torch.empty_like(flat)
        # Each condition streams only its own images (a prompt's are a small part of the data);
        # the unconditional one all of them.
        keys = torch.stack([cond["prompt"], cond["direction"]], -1)
        unique, inverse = torch.unique(keys, dim=0, return_inverse=True)
        for k, (prompt, direction) in enumerate(unique.tolist()):
            rows = (inverse == k).nonzero()[:, 0]
            mask = self.subset_mask(prompt, direction)
            images = None if mask.all() else mask.nonzero()[:, 0]
            out[rows] = self._posterior_mean(flat[rows], a[rows], s2[rows],
                                             None if shift is None else shift[rows], images)
        return out.to(x_t.dtype).reshape(x_t.shape)

    def _posterior_mean(self, flat: Tensor, a: Tensor, s2: Tensor, shift: Optional[Tensor],
                        images: Optional[Tensor]) -> Tensor:
        """``sum_i softmax_i X_i(b)`` over ``images`` (indices ``[M]``; None: all), for ``flat
        [B, 3*H*W]`` float64 with ``a``, ``s2 [B,1]`` and the background ``shift [B,3]`` or
        None. Returns ``[B, 3*H*W]``."""
        B = flat.shape[0]
        if shift is not None:
            # x . X_i(b) gains sum_c shift_c (x_c . T_i); |X_i(b)|^2 gains
            # 2 shift . (X_i . T_i) + |shift|^2 |T_i|^2 (T_i = 1 - O_i, per channel).
            shifted_x = (flat.view(B, 3, -1) * shift[:, :, None]).sum(1)  # [B, H*W]
            shift_sq = (shift ** 2).sum(-1, keepdim=True)
        n = self.data.shape[0] if images is None else images.shape[0]

        # 1. Every image's score: -|x - aX|^2 / 2s^2 up to a per-row constant is score / s^2,
        #    with score = a x.X - a^2 |X|^2 / 2.
        score = torch.empty(B, n, dtype=flat.dtype, device=flat.device)
        for start in range(0, n, self.chunk_size):
            rows = self._rows(images, slice(start, start + self.chunk_size))
            dot, sq = flat @ self.data[rows].T, self.sq_norms[rows]
            if shift is not None:
                dot = dot + shifted_x @ self.transparency[rows].T
                sq = (sq + 2 * shift @ self.data_dot_transparency[rows].T
                      + shift_sq * self.transparency_sq[rows])
            score[:, start:start + self.chunk_size] = a * dot - 0.5 * a * a * sq

        # 2. Softmax weights, relative to each row's largest (which is 1).
        weights = torch.exp((score - score.max(-1, keepdim=True).values) / s2)
        total = weights.sum(-1, keepdim=True)

        # 3. The weighted sum, without the images under NEGLIGIBLE_WEIGHT / n in every row
        #    (they stay in the total): together they move the result by less than
        #    NEGLIGIBLE_WEIGHT of its scale, and they are most of the data below t ~ 0.8.
        kept = (weights > NEGLIGIBLE_WEIGHT / n).any(0)  # [n]
        acc = torch.zeros_like(flat)
        for start in range(0, n, self.chunk_size):
            chunk = slice(start, start + self.chunk_size)
            kept_here = kept[chunk]
            if not kept_here.any():
                continue
            # Gathered only where that reads less: a gather copies its rows, and summing a
            # negligible image is harmless.
            if 2 * kept_here.sum() < kept_here.shape[0]:
                chunk = kept_here.nonzero()[:, 0] + start
            rows = self._rows(images, chunk)
            w = weights[:, chunk]
            acc += w @ self.data[rows]
            if shift is not None:
                shifted = (w @ self.transparency[rows])[:, None, :] * shift[:, :, None]
                acc += shifted.reshape(B, -1)
        return acc / total

    @staticmethod
    def _rows(images: Optional[Tensor], chunk: Union[slice, Tensor]) -> Union[slice, Tensor]:
        """Dataset rows of positions ``chunk`` (a slice or indices) in the streamed images."""
        return chunk if images is None else images[chunk]

    @torch.no_grad()
    def nearest_opacity(self, x: Tensor) -> Tensor:
        """Opacity ``[B,1,R,R]`` of the dataset image nearest to each image ``x [B,3,R,R]`` in
        [-1, 1]: what a sample at ``t = 0`` (one of the dataset's images) was composited with."""
        if self.transparency is None:
            raise ValueError("the prior was built without its images' opacity (from_pretrained "
                             "loads it from the dataset)")
        flat = x.reshape(x.shape[0], -1).to(self.data)
        nearest = (self.sq_norms[None] - 2 * flat @ self.data.T).argmin(-1)
        opacity = 1 - self.transparency[nearest]
        return opacity.reshape(x.shape[0], 1, *x.shape[2:]).to(x.dtype)

    def _background_shift(self, cond: Condition, batch: int, like: Tensor) -> Optional[Tensor]:
        """``b - b_data`` in the [-1, 1] data scale per item ``[B,3]``; None when no item's
        background differs from the data's (the plain, cheaper path)."""
        if "background" not in cond:
            return None
        shift = 2 * (cond["background"].to(like).reshape(batch, 3) - self.data_background)
        if not shift.any():
            return None
        if self.transparency is None:
            raise ValueError("renders on other backgrounds need the dataset's opacity: build "
                             "the prior with opacity= (from_pretrained loads it from the "
                             "dataset)")
        return shift
