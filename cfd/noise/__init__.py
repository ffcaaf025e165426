"""Distillation noise from surface points, opacity and the latent grid (nothing else).

``make_noise(cfg, channels, device, seed)`` returns a callable ``noise(points, opacity,
latent_shape) -> [B,C,h,w]`` with ``refresh(gamma)``, ``state_dict()`` and ``load_state_dict()``:
multi-view-consistent noise for CFD (``mode: consistent``) or fresh i.i.d. noise for SDS
(``mode: iid``).
"""

from .consistent import ConsistentNoise, IIDNoise, NoiseConfig


def make_noise(cfg: NoiseConfig, channels: int, device, seed: int = 0):
    if cfg.mode == "consistent":
        return ConsistentNoise(cfg, channels, device, seed)
    if cfg.mode == "iid":
        return IIDNoise(cfg, channels, device, seed)
    raise ValueError(f"unknown noise mode {cfg.mode!r}; use 'consistent' or 'iid'")


__all__ = ["make_noise", "NoiseConfig", "ConsistentNoise", "IIDNoise"]
