"""Densification and pruning of splats during optimisation.

Wraps gsplat's ``DefaultStrategy`` (the 3D Gaussian Splatting schedule: clone small splats and
split large ones with large screen-space gradients, prune transparent or oversized ones). gsplat
1.5.3 writes its periodic opacity reset as ``step % reset_every == 0 & step > 0``, which Python
parses as ``step % reset_every == (0 & step) > 0`` and is never true; ``Densifier`` performs the
reset itself on the intended schedule (the reset is idempotent, so a fixed gsplat is harmless).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Dict

import torch

from core.runtime import TrainingStopped

from .splats import Splats


@dataclass
class DensifyConfig:
    """gsplat ``DefaultStrategy`` settings (same names and meaning)."""

    enabled: bool = True
    prune_opa: float = 0.005
    grow_grad2d: float = 0.0002
    grow_scale3d: float = 0.01
    grow_scale2d: float = 0.05
    prune_scale3d: float = 0.1
    prune_scale2d: float = 0.15
    refine_scale2d_stop_iter: int = 0
    refine_start_iter: int = 500
    refine_stop_iter: int = 15000
    reset_every: int = 3000
    refine_every: int = 100
    absgrad: bool = False
    revised_opacity: bool = False


class Densifier:
    """Runs the strategy around each backward pass and owns its running state."""

    def __init__(self, cfg: DensifyConfig, scene_scale: float):
        from gsplat.strategy import DefaultStrategy

        self.cfg = cfg
        kwargs = {k: v for k, v in asdict(cfg).items() if k != "enabled"}
        self.strategy = DefaultStrategy(verbose=False, **kwargs)
        self.state: Dict[str, Any] = self.strategy.initialize_state(scene_scale=scene_scale)

    def check(self, splats: Splats, optimizers: Dict[str, torch.optim.Optimizer]) -> None:
        self.strategy.check_sanity(splats.params, optimizers)

    def before_backward(self, splats: Splats, optimizers, step: int, info: Dict[str, Any]) -> None:
        """Call after rendering, before ``loss.backward()``: keeps the 2D-mean gradients."""
        if self.cfg.enabled and step < self.cfg.refine_stop_iter:
            self.strategy.step_pre_backward(splats.params, optimizers, self.state, step, info)

    def after_backward(self, splats: Splats, optimizers, step: int, info: Dict[str, Any]) -> None:
        """Call after ``loss.backward()`` and before the optimiser step: grows, prunes, resets."""
        if not self.cfg.enabled or step >= self.cfg.refine_stop_iter:
            return
        self.strategy.step_post_backward(splats.params, optimizers, self.state, step, info)
        if len(splats) == 0:
            c = self.cfg
            raise TrainingStopped(
                f"densification pruned every splat at step {step}, leaving nothing to train "
                f"(densify.prune_opa={c.prune_opa}, prune_scale3d={c.prune_scale3d}, "
                f"prune_scale2d={c.prune_scale2d}); start a new run with a lower "
                "densify.prune_opa or higher prune_scale3d / prune_scale2d")
        if step > 0 and step % self.cfg.reset_every == 0:
            from gsplat.strategy.ops import reset_opa

            reset_opa(splats.params, optimizers, self.state, value=self.cfg.prune_opa * 2.0)

    def state_dict(self) -> Dict[str, Any]:
        return {k: (v.clone() if torch.is_tensor(v) else v) for k, v in self.state.items()}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        self.state = dict(state)
