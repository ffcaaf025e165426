"""Stage 2's VAE encoder (``SLatEncoder``): per-voxel features -> the structured latent's
posterior.

The sparse swin transformer torso the Gaussian decoder has (:class:`SparseTransformerBase`),
then, as the released encoder: a layer norm without affine and ``out_layer``, a linear map to
``2 * latent_channels`` per voxel, split into the posterior's mean (first half) and
log-variance (second half). Released args (``slat_enc_swin8_B_64l8``): resolution 64, 1024
input channels (averaged DINOv2 features), model 768, latent 8, 12 blocks, 12 heads, window 8.
It is used in training only (the generator samples latents with the flow).
"""

from __future__ import annotations

from typing import Optional, Tuple

from torch import Tensor

from .gaussian_decoder import SparseTransformerBase
from .sparse import SparseLinear, SparseTensor


class SLatEncoder(SparseTransformerBase):
    def __init__(self, resolution: int, in_channels: int, model_channels: int,
                 latent_channels: int, num_blocks: int, num_heads: Optional[int] = None,
                 num_head_channels: int = 64, mlp_ratio: float = 4.0, attn_mode: str = "swin",
                 window_size: int = 8, pe_mode: str = "ape", use_fp16: bool = False,
                 use_checkpoint: bool = False, qk_rms_norm: bool = False):
        super().__init__(in_channels, model_channels, num_blocks, num_heads, num_head_channels,
                         mlp_ratio, attn_mode, window_size, pe_mode, qk_rms_norm)
        self.resolution, self.latent_channels = resolution, latent_channels
        self.out_layer = SparseLinear(model_channels, 2 * latent_channels)

    def forward(self, x: SparseTensor) -> Tuple[Tensor, Tensor]:
        """``x``: ``feats [N, in_channels]`` at ``coords [N, 4]`` (the voxels of a
        ``resolution``^3 grid) -> the posterior's ``mean`` and ``logvar``, each
        ``[N, latent_channels]`` (sampling is the caller's: its random state is the trainer's)."""
        mean, logvar = self.out_layer(self.torso(x)).feats.chunk(2, dim=-1)
        return mean, logvar
