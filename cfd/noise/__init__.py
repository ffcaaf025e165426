"""Distillation noise from surface points, opacity and the latent grid (nothing else).

``make_noise(cfg, channels, device, seed)`` returns a callable ``noise(points, opacity,
latent_shape) -> [B,C,h,w]`` with ``refresh(gamma)``, ``state_dict()`` and ``load_state_dict()``:
multi-view-consistent noise for CFD (``mode: consistent``) or fresh i.i.d. noise for SDS
(``mode: iid``).
"""


from core.errors import UserError

from .consistent import ConsistentNoise, IIDNoise, NoiseConfig, NoiseMode


def make_noise(cfg: NoiseConfig, channels: int, device, seed: int = 0):
    if cfg.mode not in [*NoiseMode, *(m.value for m in NoiseMode)]:
        raise UserError(f"unknown noise mode {cfg.mode!r}; use "
                        f"{' or '.join(repr(m.value) for m in NoiseMode)}")
    if NoiseMode(cfg.mode) is NoiseMode.consistent:
        return ConsistentNoise(cfg, channels, device, seed)
    return IIDNoise(cfg, channels, device, seed)


__all__ = ["make_noise", "NoiseConfig", "NoiseMode", "ConsistentNoise", "IIDNoise"]
