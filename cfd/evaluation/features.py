"""Metrics on learned features of renders: CLIP score, CLIP R-precision, Fréchet distance of
DINOv2 features.

Models load offline only, from a local folder or a Hugging Face hub id already in the local
cache (``guidance.loading.resolve_model_path``); a missing model raises
:class:`guidance.loading.ModelWeightsNotFound` (a ``FileNotFoundError``) naming the setting and
how to provide the weights, before any image is processed.

* **CLIP score** (as torchmetrics defines it): ``max(100 * cos(E_I, E_T), 0)``, E the CLIP image
  and text embeddings; over several views the cosines are averaged first, then clamped (as
  torchmetrics does over a batch).
* **CLIP R-precision**: each rendered view ranks a set of prompts by cosine with its image
  embedding; a hit when the object's own prompt is among the top k. Reported as the share of
  views that hit.
* **Fréchet distance on DINOv2** (the protocol the TRELLIS paper reports; its code was never
  released, so this follows the description): the CLS token of DINOv2's last layer (after its
  final layer norm, what torch.hub's DINOv2 returns) for every render of each set, a Gaussian
  fitted to each set, ``|mu_a - mu_b|^2 + tr(S_a + S_b - 2 (S_a S_b)^(1/2))``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Callable, List, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor
from transformers import AutoModel, CLIPModel, CLIPProcessor

from guidance.loading import ModelWeightsNotFound, hf_cache_dir, resolve_model_path

from ..utils.media import to_uint8

DEFAULT_CLIP_MODEL = "openai/clip-vit-large-patch14"  # torchmetrics' CLIPScore default
DEFAULT_DINOV2_MODEL = "facebook/dinov2-large"  # ViT-L/14; TRELLIS's evaluation code is unreleased
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

ModelId = Union[str, os.PathLike]


def _load_offline(load: Callable, model_id: ModelId, option: str):
    """``load(folder)`` on the resolved local folder of ``model_id``; a folder that resolves
    but does not load (a partial download) is also :class:`ModelWeightsNotFound`."""
    folder = resolve_model_path(model_id, index_file="config.json", option=option)
    try:
        return load(folder)
    except OSError as err:
        raise ModelWeightsNotFound(os.fspath(model_id), hf_cache_dir(),
                                   f"loading {str(folder)!r} failed: {err}", option) from err


# -- CLIP -----------------------------------------------------------------------------------------
@dataclass
class ClipModels:
    """A CLIP model (image and text towers) with the processor its checkpoint ships."""

    model: CLIPModel
    processor: CLIPProcessor
    device: torch.device


def load_clip(model_id: ModelId = DEFAULT_CLIP_MODEL, device: Union[str, torch.device] = "cpu",
              option: str = "evaluation.clip_model") -> ClipModels:
    """CLIP from a local folder or the hub cache (never downloaded); ``option`` is the
    setting named in the error when it is missing."""
    # the processor first: it is small, so a folder without one fails before the weights load
    processor = _load_offline(lambda f: CLIPProcessor.from_pretrained(f, local_files_only=True),
                              model_id, option)
    model = _load_offline(lambda f: CLIPModel.from_pretrained(f, local_files_only=True),
                          model_id, option)
    return ClipModels(model.to(device).eval(), processor, torch.device(device))


def _check_images(images: Tensor) -> None:
    if images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"images must be renders [B,H,W,3] in [0, 1], got "
                         f"{tuple(images.shape)}")


@torch.no_grad()
def clip_image_embeddings(clip: ClipModels, images: Tensor, batch_size: int = 32) -> Tensor:
    """Unit CLIP embeddings of renders, preprocessed by the checkpoint's processor from 8-bit
    images (what a saved PNG holds). ``[B,H,W,3]`` in [0, 1] -> ``[B,D]``."""
    _check_images(images)
    embeddings = []
    for start in range(0, len(images), batch_size):
        pixels = clip.processor(images=list(to_uint8(images[start:start + batch_size])),
                                return_tensors="pt").pixel_values.to(clip.device)
        pooled = clip.model.vision_model(pixel_values=pixels).pooler_output
        embeddings.append(clip.model.visual_projection(pooled))
    return F.normalize(torch.cat(embeddings).float(), dim=-1)


@torch.no_grad()
def clip_text_embeddings(clip: ClipModels, texts: Sequence[str]) -> Tensor:
    """Unit CLIP embeddings of prompts (truncated to the tokenizer's length). ``T -> [T,D]``."""
    tokens = clip.processor(text=list(texts), padding=True, truncation=True,
                            return_tensors="pt").to(clip.device)
    pooled = clip.model.text_model(input_ids=tokens.input_ids,
                                   attention_mask=tokens.attention_mask).pooler_output
    return F.normalize(clip.model.text_projection(pooled).float(), dim=-1)


def clip_score(clip: ClipModels, images: Tensor, prompt: str) -> float:
    """CLIP score of an object's rendered views against its prompt (module docstring):
    ``max(100 * mean_v cos(E_v, E_prompt), 0)``. ``images [V,H,W,3]`` in [0, 1]."""
    cosines = clip_image_embeddings(clip, images) @ clip_text_embeddings(clip, [prompt])[0]
    return max(100.0 * float(cosines.double().mean()), 0.0)


def r_precision_hits(image_embeddings: Tensor, text_embeddings: Tensor, targets: Tensor,
                     k: int = 1) -> Tensor:
    """Whether each image's target text ranks among its ``k`` most similar texts.

    Args:
        image_embeddings: ``[N,D]``; text_embeddings: ``[T,D]`` (cosine needs unit vectors);
        targets: ``[N]`` int64 index of each image's own text; k: 1 <= k <= T.
    Returns:
        ``[N]`` bool. A text tied with the target counts against it (a strict rank).
    """
    if not 1 <= k <= len(text_embeddings):
        raise ValueError(f"k must be in 1..{len(text_embeddings)} (the number of texts), got {k}")
    similarity = image_embeddings @ text_embeddings.T
    own = similarity.gather(1, targets[:, None])
    better_or_tied = (similarity >= own).sum(1) - 1  # other texts at least as similar
    return better_or_tied < k


def clip_r_precision(clip: ClipModels, renders: Sequence[Tensor], prompts: Sequence[str],
                     distractors: Sequence[str] = (), k: int = 1) -> float:
    """CLIP R-precision: the share of rendered views whose own prompt ranks in the top ``k``
    among the objects' prompts and the ``distractors`` (duplicates counted once).

    Args:
        renders: one ``[V_i,H,W,3]`` batch of views per object, in [0, 1].
        prompts: each object's prompt.
        distractors: more prompts to retrieve from (e.g. the rest of a prompt suite).
    """
    if len(renders) != len(prompts) or not prompts:
        raise ValueError(f"need one prompt per object (and at least one object), got "
                         f"{len(renders)} render batches and {len(prompts)} prompts")
    candidates: List[str] = list(dict.fromkeys([*prompts, *distractors]))
    text_embeddings = clip_text_embeddings(clip, candidates)
    hits = []
    for views, prompt in zip(renders, prompts):
        targets = torch.full((len(views),), candidates.index(prompt), device=clip.device)
        hits.append(r_precision_hits(clip_image_embeddings(clip, views), text_embeddings,
                                     targets, k))
    return float(torch.cat(hits).double().mean())


# -- DINOv2 and the Fréchet distance --------------------------------------------------------------
def load_dinov2(model_id: ModelId = DEFAULT_DINOV2_MODEL,
                device: Union[str, torch.device] = "cpu",
                option: str = "evaluation.dinov2_model") -> torch.nn.Module:
    """A transformers DINOv2 (with or without registers) from a local folder or the hub cache
    (never downloaded); ``option`` is the setting named in the error when it is missing."""
    model = _load_offline(lambda f: AutoModel.from_pretrained(f, local_files_only=True),
                          model_id, option)
    return model.to(device).eval()


@torch.no_grad()
def dinov2_cls_features(model: torch.nn.Module, images: Tensor, image_size: int = 224,
                        batch_size: int = 32) -> Tensor:
    """DINOv2 CLS features of renders: resized (bicubic, antialiased) to ``image_size``
    square, ImageNet-normalised, the last layer's CLS token after the final layer norm.

    Args:
        images: ``[B,H,W,3]`` in [0, 1] (square renders keep their aspect).
        image_size: a multiple of the patch size (14); 224 is DINOv2's training size.
    Returns:
        ``[B,C]`` float64.
    """
    _check_images(images)
    patch = model.config.patch_size
    if image_size % patch:
        raise ValueError(f"image_size must be a multiple of DINOv2's patch size {patch}, got "
                         f"{image_size}")
    device = next(model.parameters()).device
    mean = torch.tensor(IMAGENET_MEAN, device=device)[:, None, None]
    std = torch.tensor(IMAGENET_STD, device=device)[:, None, None]
    features = []
    for start in range(0, len(images), batch_size):
        x = images[start:start + batch_size].to(device, torch.float32).permute(0, 3, 1, 2)
        x = F.interpolate(x, size=(image_size, image_size), mode="bicubic", antialias=True,
                          align_corners=False).clamp(0, 1)
        features.append(model(pixel_values=(x - mean) / std).pooler_output.double())
    return torch.cat(features)


def _symmetric_sqrt(matrix: Tensor) -> Tensor:
    """Square root of a symmetric positive semi-definite matrix by eigen-decomposition
    (eigenvalues below 0, from rounding, taken as 0). ``[C,C] -> [C,C]``."""
    eigenvalues, eigenvectors = torch.linalg.eigh((matrix + matrix.T) / 2)
    return (eigenvectors * eigenvalues.clamp(min=0).sqrt()) @ eigenvectors.T


def frechet_distance_from_stats(mu_a: Tensor, sigma_a: Tensor, mu_b: Tensor,
                                sigma_b: Tensor) -> float:
    """Fréchet distance between Gaussians ``N(mu_a, sigma_a)`` and ``N(mu_b, sigma_b)``:
    ``|mu_a - mu_b|^2 + tr(sigma_a) + tr(sigma_b) - 2 tr((sigma_a sigma_b)^(1/2))``.

    ``sigma_a sigma_b`` is not symmetric, and a general matrix square root of it is unstable
    for the nearly singular covariances of few samples in many dimensions; it is similar to
    the symmetric ``sigma_a^(1/2) sigma_b sigma_a^(1/2)`` (same eigenvalues), whose
    eigenvalues are read stably with ``eigh`` in float64.

    Args:
        mu_a, mu_b: ``[C]``; sigma_a, sigma_b: ``[C,C]`` covariances.
    Returns:
        the distance, >= 0 (rounding below 0 is clamped).
    """
    mu_a, mu_b, sigma_a, sigma_b = (t.double() for t in (mu_a, mu_b, sigma_a, sigma_b))
    root_a = _symmetric_sqrt(sigma_a)
    product = root_a @ sigma_b @ root_a
    trace_sqrt = torch.linalg.eigvalsh((product + product.T) / 2).clamp(min=0).sqrt().sum()
    distance = ((mu_a - mu_b) ** 2).sum() + sigma_a.trace() + sigma_b.trace() - 2 * trace_sqrt
    return max(float(distance), 0.0)


def _gaussian_fit(features: Tensor) -> Tuple[Tensor, Tensor]:
    """Mean ``[C]`` and unbiased covariance ``[C,C]`` of ``[N,C]`` features (N >= 2)."""
    if features.ndim != 2 or len(features) < 2:
        raise ValueError(f"a Gaussian fit needs features [N,C] with N >= 2, got "
                         f"{tuple(features.shape)}")
    features = features.double()
    return features.mean(0), torch.cov(features.T, correction=1).reshape(features.shape[1], -1)


def frechet_distance(features_a: Tensor, features_b: Tensor) -> float:
    """Fréchet distance between Gaussians fitted to two feature sets ``[N,C]``, ``[M,C]``
    (N, M >= 2; unbiased covariances)."""
    if features_a.shape[1:] != features_b.shape[1:]:
        raise ValueError(f"feature sizes differ: {tuple(features_a.shape)} and "
                         f"{tuple(features_b.shape)}")
    return frechet_distance_from_stats(*_gaussian_fit(features_a), *_gaussian_fit(features_b))


def dinov2_frechet_distance(model: torch.nn.Module, images_a: Tensor, images_b: Tensor,
                            image_size: int = 224) -> float:
    """Fréchet distance between the DINOv2 CLS features of two sets of renders
    ``[N,H,W,3]``, ``[M,H',W',3]`` in [0, 1] (e.g. results and references)."""
    return frechet_distance(dinov2_cls_features(model, images_a, image_size),
                            dinov2_cls_features(model, images_b, image_size))
