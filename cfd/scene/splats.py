"""A 3D Gaussian splat scene: learnable parameters in gsplat's layout.

Parameters (pre-activation, as 3D Gaussian Splatting stores them):

==============  ============  =========================================
key             shape         activation
==============  ============  =========================================
``means``       ``[N,3]``     none
``scales``      ``[N,3]``     ``exp`` (log-scales)
``quats``       ``[N,4]``     normalised (wxyz)
``opacities``   ``[N]``       ``sigmoid`` (logits)
``sh0``         ``[N,1,3]``   colour ``max(C0 * sh0 + 0.5 + ..., 0)``
``shN``         ``[N,K-1,3]`` higher SH bands, ``K = (sh_degree+1)^2``
==============  ============  =========================================

The keys match gsplat's strategies, so ``DefaultStrategy`` can grow and prune them in place.
"""

from __future__ import annotations

import math
from typing import Dict, Optional, Tuple

import torch
from torch import Tensor, nn

from .ply import read_ply, write_ply
from .sh import rgb_to_sh0, sh0_to_rgb

PARAM_KEYS = ("means", "scales", "quats", "opacities", "sh0", "shN")


class Splats(nn.Module):
    """N Gaussians with SH colour of degree ``sh_degree`` (0 = view-independent RGB)."""

    def __init__(self, params: Dict[str, Tensor], sh_degree: int = 0):
        super().__init__()
        if not 0 <= sh_degree <= 3:
            raise ValueError(f"sh_degree must be in 0..3, got {sh_degree}")
        missing = [k for k in PARAM_KEYS if k not in params]
        if missing:
            raise ValueError(f"Splats needs parameters {PARAM_KEYS}; missing {missing}")
        N = params["means"].shape[0]
        n_rest = (sh_degree + 1) ** 2 - 1
        expected = {
            "means": (N, 3), "scales": (N, 3), "quats": (N, 4), "opacities": (N,),
            "sh0": (N, 1, 3), "shN": (N, n_rest, 3),
        }
        for key, shape in expected.items():
            if tuple(params[key].shape) != shape:
                raise ValueError(f"Splats.{key} must be {shape}, got {tuple(params[key].shape)}")
        # Checked here, on the stored (pre-activation) values: the renderer sees only their
        # activations, which turn an infinite log-scale or opacity logit into a finite value.
        finite = torch.stack([torch.isfinite(params[k]).all() for k in PARAM_KEYS]).tolist()
        broken = [k for k, ok in zip(PARAM_KEYS, finite) if not ok]
        if broken:
            raise ValueError(f"Splats parameters {broken} contain NaN or Inf (a broken file or "
                             "a diverged optimisation); re-initialise the splats")
        self.sh_degree = sh_degree
        self.params = nn.ParameterDict(
            {k: nn.Parameter(params[k].detach().clone().float()) for k in PARAM_KEYS}
        )

    # -- construction -------------------------------------------------------------------------
    @classmethod
    def from_activated(
        cls,
        means: Tensor,
        scales: Tensor,
        quats: Tensor,
        opacities: Tensor,
        colors: Tensor,
        sh_degree: int = 0,
    ) -> "Splats":
        """Build from the activated values gsplat's ``rasterization`` takes.

        Args:
            means ``[N,3]``; scales ``[N,3]`` > 0; quats ``[N,4]`` wxyz, non-zero; opacities
            ``[N]`` in (0, 1); colors ``[N,3]`` RGB in [0, 1] (higher SH bands start at zero).
        """
        N = means.shape[0]
        if tuple(colors.shape) != (N, 3):
            raise ValueError(f"colors must be [N,3] RGB with N={N}, got {tuple(colors.shape)}; "
                             "pass the DC colour (an alpha channel goes in opacities)")
        if not (torch.isfinite(scales) & (scales > 0)).all():
            raise ValueError("scales must be finite and > 0 (activated values); pass "
                             "exp(log_scales)")
        if not ((opacities > 0) & (opacities < 1)).all():  # also refuses NaN
            raise ValueError("opacities must lie strictly in (0, 1) (activated values)")
        if not (quats.norm(dim=-1) > 0).all():
            raise ValueError("quats must be non-zero wxyz quaternions (a zero one has no "
                             "rotation); use [1, 0, 0, 0] for no rotation")
        params = {
            "means": means,
            "scales": torch.log(scales),
            "quats": quats,
            "opacities": torch.logit(opacities),
            "sh0": rgb_to_sh0(colors).reshape(N, 1, 3),
            "shN": means.new_zeros(N, (sh_degree + 1) ** 2 - 1, 3),
        }
        return cls(params, sh_degree)

    @classmethod
    def empty(cls, sh_degree: int = 0) -> "Splats":
        return cls(
            {
                "means": torch.zeros(0, 3), "scales": torch.zeros(0, 3),
                "quats": torch.zeros(0, 4), "opacities": torch.zeros(0),
                "sh0": torch.zeros(0, 1, 3), "shN": torch.zeros(0, (sh_degree + 1) ** 2 - 1, 3),
            },
            sh_degree,
        )

    # -- activated views ----------------------------------------------------------------------
    def __len__(self) -> int:
        return self.params["means"].shape[0]

    @property
    def device(self) -> torch.device:
        return self.params["means"].device

    @property
    def means(self) -> Tensor:
        return self.params["means"]

    @property
    def scales(self) -> Tensor:
        return torch.exp(self.params["scales"])

    @property
    def quats(self) -> Tensor:
        return torch.nn.functional.normalize(self.params["quats"], dim=-1)

    @property
    def opacities(self) -> Tensor:
        return torch.sigmoid(self.params["opacities"])

    @property
    def sh_coeffs(self) -> Tensor:
        """All SH coefficients ``[N, (sh_degree+1)^2, 3]``."""
        return torch.cat([self.params["sh0"], self.params["shN"]], dim=1)

    @property
    def base_colors(self) -> Tensor:
        """View-independent (DC) colour ``[N,3]``, clamped at 0 like the renderer."""
        return sh0_to_rgb(self.params["sh0"][:, 0, :]).clamp(min=0.0)

    # -- optimisation -------------------------------------------------------------------------
    def make_optimizers(
        self, lrs: Dict[str, float], eps: float = 1e-15
    ) -> Dict[str, torch.optim.Optimizer]:
        """One Adam per parameter (one group each), the layout gsplat's strategies need."""
        unknown = set(lrs) - set(PARAM_KEYS)
        if unknown:
            raise ValueError(f"learning rates for unknown parameters {sorted(unknown)}; "
                             f"valid keys are {PARAM_KEYS}")
        return {
            k: torch.optim.Adam([{"params": self.params[k], "lr": lrs.get(k, 0.0), "name": k}],
                                eps=eps)
            for k in PARAM_KEYS
        }

    # -- I/O ----------------------------------------------------------------------------------
    def scaled(self, factor: float) -> "Splats":
        """The scene ``factor`` times larger about the origin (centres and sizes)."""
        if not factor > 0:
            raise ValueError(f"a scale factor must be > 0, got {factor}")
        params = {k: v.detach() for k, v in self.params.items()}
        params["means"] = params["means"] * factor
        params["scales"] = params["scales"] + math.log(factor)
        return Splats(params, self.sh_degree)

    def turned(self, degrees: float) -> "Splats":
        """The scene turned by ``degrees`` about the up (z) axis through the origin (centres
        and orientations; a camera at azimuth ``a + degrees`` then sees what one at ``a`` saw).
        View-dependent colour (SH degree > 0) would need its coefficients rotated too."""
        if self.sh_degree > 0:
            raise ValueError(f"turning splats with SH degree {self.sh_degree} is not supported "
                             "(their view-dependent colour would not turn); use degree 0")
        angle = math.radians(degrees)
        c, s = math.cos(angle), math.sin(angle)
        params = {k: v.detach() for k, v in self.params.items()}
        x, y, z = params["means"].unbind(-1)
        params["means"] = torch.stack([c * x - s * y, s * x + c * y, z], -1)
        # q_turn * q with q_turn = (cos a/2, 0, 0, sin a/2), wxyz
        cw, sz = math.cos(angle / 2), math.sin(angle / 2)
        w, qx, qy, qz = params["quats"].unbind(-1)
        params["quats"] = torch.stack([cw * w - sz * qz, cw * qx - sz * qy, cw * qy + sz * qx,
                                       cw * qz + sz * w], -1)
        return Splats(params, self.sh_degree)

    def save_ply(self, path, extra: Optional[Dict[str, Tensor]] = None) -> None:
        """Write the 3DGS ``.ply`` layout; ``extra``: more per-splat values ``{name: [N]}``."""
        write_ply(self.params, self.sh_degree, path, extra)

    @classmethod
    def load_ply(cls, path) -> "Splats":
        """Read a 3DGS-layout ``.ply`` (:func:`cfd.scene.ply.read_ply`)."""
        params, sh_degree = read_ply(path)
        return cls(params, sh_degree=sh_degree)


def random_ball(
    n: int,
    radius: float = 0.5,
    scale: Optional[float] = None,
    opacity: float = 0.1,
    sh_degree: int = 0,
    generator: Optional[torch.Generator] = None,
) -> Splats:
    """``n`` splats uniform in a ball, random colours, isotropic scales.

    ``scale`` defaults to the mean spacing of the points, ``radius * n^(-1/3)``.
    """
    if n < 0:
        raise ValueError(f"number of splats must be >= 0, got {n}")
    direction = torch.nn.functional.normalize(torch.randn(n, 3, generator=generator), dim=-1)
    r = radius * torch.rand(n, 1, generator=generator) ** (1.0 / 3.0)
    spacing = scale if scale is not None else radius * max(n, 1) ** (-1.0 / 3.0)
    return Splats.from_activated(
        means=direction * r,
        scales=torch.full((n, 3), float(spacing)),
        quats=torch.tensor([1.0, 0.0, 0.0, 0.0]).repeat(n, 1),
        opacities=torch.full((n,), float(opacity)),
        colors=torch.rand(n, 3, generator=generator),
        sh_degree=sh_degree,
    )


def cell_groups(means: Tensor, cell: float) -> Tuple[Tensor, int]:
    """The cube of side ``cell`` (a grid through the origin) each centre ``[N,3]`` falls in,
    numbered ``0..G-1`` in sorted order: ``[N]`` long, and G."""
    if not cell > 0:
        raise ValueError(f"a cell size must be > 0, got {cell}")
    keys = torch.floor(means.detach() / cell).long()
    _, group = torch.unique(keys, dim=0, return_inverse=True)
    return group, int(group.max()) + 1 if len(group) else 0


def group_mean(values: Tensor, weights: Tensor, group: Tensor, groups: int) -> Tensor:
    """Per group, the ``weights [N]``-weighted mean of ``values [N, ...]``: ``[G, ...]``."""
    shape = values.shape[1:]
    flat = values.reshape(len(values), -1) * weights[:, None]
    total = flat.new_zeros(groups, flat.shape[1]).index_add_(0, group, flat)
    norm = weights.new_zeros(groups).index_add_(0, group, weights).clamp_min(1e-12)
    return (total / norm[:, None]).reshape(groups, *shape)


def merge_in_cells(splats: Splats, cell: float) -> Tuple[Splats, Tensor]:
    """Fewer, larger splats: those whose centres share a cube of side ``cell`` become one
    (a voxel-grid downsampling), for a start with fewer splats than a generator gives (its
    32 per voxel make every step of a later optimisation slow).

    Within a cube, weighted by opacity: the centre and the colour (all SH bands) are averaged,
    the scale per axis is the members' spread (standard deviation of their centres) plus their
    mean size, axis-aligned; the opacity is what the members cover together,
    ``1 - prod(1 - o)``, kept below 0.99 so the merged splat can still learn.

    Returns the merged splats (``G`` of them) and each input splat's group ``[N]`` (to merge
    other per-splat values with :func:`group_mean`).
    """
    return _merge_groups(splats, *cell_groups(splats.means, cell))


def _merge_groups(splats: Splats, group: Tensor, groups: int) -> Tuple[Splats, Tensor]:
    """The splats of each group ``[N]`` (numbered ``0..groups-1``) merged into one, as
    :func:`merge_in_cells` describes; the merged splats and ``group``."""
    with torch.no_grad():
        opacity = splats.opacities.detach()
        means = group_mean(splats.means.detach(), opacity, group, groups)
        spread = group_mean((splats.means.detach() - means[group]).square(), opacity, group,
                            groups).sqrt()
        size = group_mean(splats.scales.detach(), opacity, group, groups)
        # prod(1 - o) as exp(sum(log(1 - o)))
        uncovered = opacity.new_zeros(groups).index_add_(
            0, group, torch.log1p(-opacity.clamp(max=1 - 1e-6))).exp()
        params = {
            "means": means,
            "scales": torch.log(spread + size),
            "quats": means.new_tensor([1.0, 0.0, 0.0, 0.0]).repeat(groups, 1),
            "opacities": torch.logit((1 - uncovered).clamp(1e-4, 0.99)),
            "sh0": group_mean(splats.params["sh0"].detach(), opacity, group, groups),
            "shN": group_mean(splats.params["shN"].detach(), opacity, group, groups),
        }
    return Splats(params, splats.sh_degree), group


def merge_to_count(splats: Splats, max_count: int, first_cell: float = 0.005,
                   growth: float = 1.25) -> Tuple[Splats, Tensor]:
    """:func:`merge_in_cells` in the smallest cubes (``first_cell`` times powers of
    ``growth``) that leave at most ``max_count`` splats; splats already that few are kept as
    they are (each its own group ``[N]``)."""
    if max_count < 1:
        raise ValueError(f"max_count must be >= 1, got {max_count}")
    if len(splats) <= max_count:
        return splats, torch.arange(len(splats), device=splats.device)
    cell = first_cell
    group, groups = cell_groups(splats.means, cell)
    while groups > max_count:
        cell *= growth
        group, groups = cell_groups(splats.means, cell)
    return _merge_groups(splats, group, groups)


def from_point_cloud(
    points: Tensor,
    colors: Optional[Tensor] = None,
    opacity: float = 0.1,
    sh_degree: int = 0,
    k_neighbours: int = 3,
) -> Splats:
    """One isotropic splat per point, scaled by the mean distance to its nearest neighbours.

    Args:
        points ``[N,3]``; colors ``[N,3]`` in [0,1] (default grey).
    """
    if points.ndim != 2 or points.shape[-1] != 3:
        raise ValueError(f"points must be [N,3], got {tuple(points.shape)}")
    N = points.shape[0]
    if N == 0:
        return Splats.empty(sh_degree)
    if colors is None:
        colors = torch.full((N, 3), 0.5)
    k = min(k_neighbours, N - 1)
    if k > 0:
        dists = torch.cat(
            [torch.cdist(chunk, points).topk(k + 1, largest=False).values[:, 1:]
             for chunk in points.split(4096)]
        )
        scale = dists.mean(dim=-1).clamp(min=1e-4)
    else:
        scale = torch.full((N,), 0.01)
    return Splats.from_activated(
        means=points.float(),
        scales=scale[:, None].repeat(1, 3).float(),
        quats=torch.tensor([1.0, 0.0, 0.0, 0.0]).repeat(N, 1),
        opacities=torch.full((N,), float(opacity)),
        colors=colors.float(),
        sh_degree=sh_degree,
    )
