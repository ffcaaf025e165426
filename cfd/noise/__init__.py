"""Distillation noise from surface points, opacity and the latent grid (nothing else).

``make_noise(cfg, channels, device, seed)`` returns a callable ``noise(points, opacity,
latent_shape) -> [B,C,h,w]`` with ``refresh(gamma)``, ``state_dict()`` and ``load_state_dict()``:
multi-view-consistent noise for CFD (``mode: consistent``) or fresh i.i.d. noise for SDS
(``mode: iid``).
"""


from core.errors import as_choice

from .consistent import ConsistentNoise, IIDNoise, NoiseConfig, NoiseMode


def make_noise(cfg: NoiseConfig, channels: int, device, seed: int = 0):
    if as_choice(NoiseMode, cfg.mode, "noise mode") is NoiseMode.consistent:
        return ConsistentNoise(cfg, channels, device, seed)
    return IIDNoise(cfg, channels, device, seed)


__all__ = ["make_noise", "NoiseConfig", "NoiseMode", "ConsistentNoise", "IIDNoise"]
