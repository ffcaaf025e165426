"""Prompt processing: view-dependent prompts, negative prompts and an on-disk embedding cache.

Each camera gets a direction from its elevation and azimuth (degrees; azimuth 0 is the object's
front): ``overhead`` when ``elevation > overhead_threshold``, else ``front`` when
``|azimuth| < front_threshold``, ``back`` when ``|azimuth| > 180 - back_threshold``, ``side``
otherwise; with ``split_sides``, ``side`` becomes ``left side`` (azimuth > 0: the camera on the
object's left, +y) and ``right side``; with ``diagonal_views`` as well, the circle is cut into
eight equal sectors centred on 0, 45, ..., 315 degrees (the thresholds then unused), the four
between the others called ``front left``, ``back left``, ``back right`` and ``front right``.
With ``view_dependent`` on, the direction's suffix is
appended to the prompt ("a mug" -> "a mug, side view"). A text encoder reads a fixed window of
tokens (CLIP: 77) and cuts what follows, so for a guidance model that names its windows
(``text_windows``) a prompt too long to keep the suffixes inside them is cut at its end first,
token-aware, at a word boundary (:func:`fit_view_prompt`), with one warning. Embeddings are computed once per text
and cached on disk under ``cache_dir`` keyed by the model's text fingerprint and the text, so a
changed model or text re-encodes and an unchanged one loads from disk.
"""

from __future__ import annotations

import hashlib
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor

from core.errors import UserError
from core.runtime import atomic_write, cache_root

from .base import Condition, Guidance, select
from .latent import token_count

logger = logging.getLogger(__name__)
# Left at the end of a cut prompt before its suffix is appended ("a b," + ", front view").
_CUT_STRIP = " \t\n,;:"

def default_cache_dir() -> Path:
    return cache_root() / "text_embeddings"


@dataclass
class PromptConfig:
    prompt: str = ""
    negative_prompt: str = ""
    view_dependent: bool = True
    front_threshold: float = 45.0
    back_threshold: float = 45.0
    overhead_threshold: float = 60.0
    front_suffix: str = ", front view"
    side_suffix: str = ", side view"
    back_suffix: str = ", back view"
    overhead_suffix: str = ", overhead view"
    # A text-to-image model cannot tell a left side view from a right one (the Janus problem's
    # mirrored handles); a prior that can, such as the embedded one, may be told.
    split_sides: bool = False
    left_side_suffix: str = ", left side view"
    right_side_suffix: str = ", right side view"
    # Eight azimuth sectors of 45 degrees instead of four (needs split_sides): a prior that
    # knows its cameras is told each view's azimuth to within 22.5 degrees, not 45.
    diagonal_views: bool = False
    front_left_suffix: str = ", front left view"
    back_left_suffix: str = ", back left view"
    back_right_suffix: str = ", back right view"
    front_right_suffix: str = ", front right view"
    cache_dir: Optional[str] = None
    use_cache: bool = True

    def suffixes(self) -> Tuple[str, ...]:
        """The suffix of each direction index of ``view_directions``."""
        if self.split_sides:
            split = (self.front_suffix, self.left_side_suffix, self.back_suffix,
                     self.overhead_suffix, self.right_side_suffix)
            if self.diagonal_views:
                return split + (self.front_left_suffix, self.back_left_suffix,
                                self.back_right_suffix, self.front_right_suffix)
            return split
        return (self.front_suffix, self.side_suffix, self.back_suffix, self.overhead_suffix)


# the direction of each 45-degree sector, counter-clockwise from the front (diagonal_views)
_SECTORS = (0, 5, 1, 6, 2, 7, 4, 8)


def view_directions(elevation: Tensor, azimuth: Tensor, cfg: PromptConfig) -> Tensor:
    """Direction index per camera (0 front, 1 side, 2 back, 3 overhead; with ``split_sides``
    1 is the left side and 4 the right; with ``diagonal_views`` 5 front left, 6 back left,
    7 back right, 8 front right). ``[B] -> [B]`` long."""
    if cfg.diagonal_views and not cfg.split_sides:
        raise UserError("prompt_processor.diagonal_views names left and right views: set "
                        "prompt_processor.split_sides=true as well")
    az = torch.remainder(torch.as_tensor(azimuth, dtype=torch.float64) + 180.0, 360.0) - 180.0
    el = torch.as_tensor(elevation, dtype=torch.float64)
    if cfg.diagonal_views:
        sector = torch.remainder(torch.round(az / 45.0).long(), 8)
        direction = torch.tensor(_SECTORS)[sector]
    else:
        direction = torch.ones_like(az, dtype=torch.long)
        if cfg.split_sides:
            direction[az < 0] = 4
        direction[az.abs() < cfg.front_threshold] = 0
        direction[az.abs() > 180.0 - cfg.back_threshold] = 2
    direction[el > cfg.overhead_threshold] = 3
    return direction


def _longest(candidates: Sequence[int], fits: Callable[[int], bool]) -> Optional[int]:
    """The largest candidate (ascending list) that fits, by bisection (fitting is monotone: a
    shorter start of a text has no more tokens); None when none fits."""
    lo, hi = 0, len(candidates)  # candidates[:lo] fit, candidates[hi:] do not
    while lo < hi:
        mid = (lo + hi) // 2
        if fits(candidates[mid]):
            lo = mid + 1
        else:
            hi = mid
    return candidates[lo - 1] if lo else None


def fit_view_prompt(prompt: str, suffixes: Sequence[str], windows) -> Tuple[str, Optional[str]]:
    """The start of ``prompt`` that keeps ``prompt + suffix`` inside every window for every
    suffix, and a warning message (None when ``prompt`` fits as it is).

    ``windows``: ``(what, tokenizer, limit)`` per text encoder (the guidance model's
    ``text_windows()``): the tokenizer's count with its special tokens must be at most ``limit``.
    The prompt is cut after its last word that fits (after a character, when not even the first
    word fits), and the punctuation and spaces left at the cut are dropped. One start serves
    every view, so the views differ in their suffixes alone. When a suffix does not fit even
    after an empty prompt the prompt is returned whole (the tokenizer cuts it as before)."""
    def fits_all(base: str) -> bool:
        return all(token_count(tok, base + s) <= limit for s in suffixes for _, tok, limit in windows)

    if not windows or not suffixes or fits_all(prompt):
        return prompt, None

    def counts(base: str) -> str:
        return "; ".join(f"{max(token_count(tok, base + s) for s in suffixes)} tokens for {what} "
                         f"(limit {limit})" for what, tok, limit in windows)

    if not fits_all(""):
        return prompt, (f"the view suffixes {list(suffixes)} do not fit the text encoders' "
                        f"windows even without the prompt ({counts('')}); the prompt {prompt!r} "
                        "is left whole and cut by the tokenizer, suffix included")
    ends = [m.end() for m in re.finditer(r"\S+", prompt)]
    cut = _longest(ends, lambda e: fits_all(prompt[:e].rstrip(_CUT_STRIP)))
    if cut is None:  # not even the first word fits: cut inside it
        cut = _longest(list(range(1, ends[0] if ends else 1)),
                       lambda e: fits_all(prompt[:e].rstrip(_CUT_STRIP))) or 0
    base = prompt[:cut].rstrip(_CUT_STRIP)
    return base, (f"the prompt with its longest view suffix is too long: {counts(prompt)}. Its "
                  f"end {prompt[len(base):].strip()!r} is cut ({counts(base)} now), so that "
                  f"every view keeps its suffix; the prompt read is {base!r}")


class PromptProcessor:
    """Per-view condition and negative condition for one prompt and one guidance model."""

    def __init__(self, cfg: PromptConfig, guidance: Guidance):
        self.cfg = cfg
        self.guidance = guidance
        self.cache_dir = Path(cfg.cache_dir) if cfg.cache_dir else default_cache_dir()
        suffixes = cfg.suffixes()
        self.prompt = cfg.prompt
        if cfg.view_dependent:
            # Models with a token window (the diffusers priors) name it; others (the embedded
            # prior) read the whole text.
            windows = getattr(guidance, "text_windows", None)
            if windows is not None:
                self.prompt, message = fit_view_prompt(cfg.prompt, suffixes, windows())
                if message:
                    logger.warning(message)
        self.texts = ([self.prompt + s for s in suffixes] if cfg.view_dependent
                      else [cfg.prompt] * len(suffixes))
        encoded = self.encode([*self.texts, cfg.negative_prompt])
        self.cond = select(encoded, torch.arange(len(suffixes)))
        self.uncond = select(encoded, torch.tensor([len(suffixes)]))

    def _cache_path(self, text: str) -> Path:
        key = hashlib.sha256(f"{self.guidance.text_fingerprint()}\n{text}".encode()).hexdigest()
        return self.cache_dir / f"{key[:32]}.pt"

    def encode(self, texts: List[str]) -> Condition:
        """Condition for each text, from the cache where possible."""
        found: Dict[int, Condition] = {}
        missing = []
        for i, text in enumerate(texts):
            if self.cfg.use_cache and self._cache_path(text).is_file():
                try:
                    found[i] = torch.load(self._cache_path(text), map_location="cpu",
                                          weights_only=True)
                    continue
                except Exception:  # a truncated or foreign file: recompute it
                    pass
            missing.append(i)
        if missing:
            unique = sorted({texts[i] for i in missing})
            fresh = self.guidance.encode_text(unique)
            for j, text in enumerate(unique):
                entry = {k: v[j : j + 1].detach().cpu() for k, v in fresh.items()}
                if self.cfg.use_cache:
                    atomic_write(self._cache_path(text), lambda f: torch.save(entry, f))
                for i in missing:
                    if texts[i] == text:
                        found[i] = entry
        device = self.guidance.device
        return {k: torch.cat([found[i][k] for i in range(len(texts))]).to(device)
                for k in found[0]}

    def directions(self, elevation: Tensor, azimuth: Tensor) -> Tensor:
        return view_directions(elevation, azimuth, self.cfg)

    def __call__(self, elevation: Tensor, azimuth: Tensor) -> Tuple[Condition, Condition]:
        """Condition and negative condition per view, each with leading dimension B."""
        index = self.directions(elevation, azimuth).to(self.cond[next(iter(self.cond))].device)
        B = index.shape[0]
        return select(self.cond, index), select(self.uncond, torch.zeros(B, dtype=torch.long))
