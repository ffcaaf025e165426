"""Issue 22, the diagnosis half: why CFD is level with SDS on the embedded testbed.

Four measurements, each writing JSON (and the arrays its figures need) to ``--out``:

``ceiling``  The 2D ceiling. Ground-truth renders of the prompt's variants from cameras drawn
             like the training cameras; the nearest dataset camera of each (angle, distance
             ratio); the prior's pull on a perfect reconstruction (PSNR of ``x0_hat`` of the
             noised ground truth against it, per t); and the prior's own 2D ODE with the run's
             schedule, CFG and step count, from the render noised to the first t and from the
             render's deterministic DDIM inversion.
``ceilings`` The per-view ceiling of every prompt's variants at several dataset densities (the
             ground truth from the nearest camera drawn as the dataset draws them, against it
             from the training camera), and with ``--pull-cameras`` the configured prior's pull
             on a perfect reconstruction; with overrides, e.g. of the cameras' distances.
``run``      A real CFD run (the README config plus overrides) stepped here with
             ``Distillation.train_step``, measured between steps without touching its RNG
             streams or state (``selfcheck`` proves it bit for bit): held-out PSNR per variant
             and rotation every ``--every`` steps (the numbers of
             ``evaluate_against_shape_world``, with the ground-truth renders cached), the
             prior's vote per variant, and the noise consistency between views 10-90 degrees
             apart on the run's own surfaces.
``plot``     The figures under ``benchmarks/figures/`` from those JSON files (``--ceilings
             LABEL=ceilings.json ...``: the ceiling against the dataset's views).

    OMP_NUM_THREADS=1 python benchmarks/diagnose_cfd.py run --seed 0 --out /tmp/cfd22/run_s0
    OMP_NUM_THREADS=1 python benchmarks/diagnose_cfd.py ceiling --out /tmp/cfd22/ceiling
    OMP_NUM_THREADS=1 python benchmarks/diagnose_cfd.py ceilings --out /tmp/cfd22/ceilings
    OMP_NUM_THREADS=1 python benchmarks/diagnose_cfd.py plot --runs /tmp/cfd22/run_s0 ...
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from cfd.cameras import Cameras, fixed_orbit_cameras, orbit_cameras  # noqa: E402
from cfd.config import load_config  # noqa: E402
from cfd.noise.consistent import ConsistentNoise, NoiseConfig  # noqa: E402
from cfd.renderers import render  # noqa: E402
from cfd.shapes import SHAPE_WORLD, object_splats, objects_for  # noqa: E402
from cfd.systems.distill import Distillation  # noqa: E402
from cfd.systems.ground_truth import (evaluate_against_shape_world, mask_iou, psnr,  # noqa: E402
                                      truth_renders)
from core.runtime import tune_malloc  # noqa: E402
from jobs.distill import DistillConfig  # noqa: E402
from jobs.skeleton import typed  # noqa: E402

CONFIG = ROOT / "configs" / "cfd-splats-embedded.yaml"
FIGURES = ROOT / "benchmarks" / "figures"


def load_settings(overrides: Sequence[str]) -> DistillConfig:
    return typed(load_config(DistillConfig, CONFIG, list(overrides)))


# -- held-out evaluation with cached ground truth -------------------------------------------------
class TruthCache:
    """``evaluate_against_shape_world`` with its ground-truth renders made once
    (:func:`truth_renders`): the same cameras, rotations, order and PSNR, so the best entry is
    the same; it also keeps every variant's best and the PSNR at rotation 0 and 180."""

    def __init__(self, prompt: str, resolution: int, background: float, n_views: int = 8,
                 elevation: float = 20.0, distance: float = 2.5, fov: float = 40.0,
                 rotation_step: float = 10.0):
        self.background = background
        self.cams = fixed_orbit_cameras(n_views, resolution, resolution, elevation, distance, fov)
        self.rotations = [float(d) for d in torch.arange(0.0, 360.0, rotation_step)]
        self.truth = truth_renders(prompt, self.cams, fov, rotation_step, background)

    @torch.no_grad()
    def evaluate(self, scene, render_options: Optional[dict] = None) -> dict:
        ours = render(scene, self.cams, background=self.background, **(render_options or {}))
        best = {"psnr": -math.inf}
        variants = {}
        for name, (rgb, alpha) in self.truth.items():
            values = [psnr(ours.rgb, gt) for gt in rgb]
            k = int(np.argmax(values))
            variants[name] = {"best_psnr": values[k], "best_rotation": self.rotations[k],
                              "psnr_rot0": values[0],
                              "psnr_rot180": values[self.rotations.index(180.0)],
                              "mask_iou_best": mask_iou(ours.alpha, alpha[k])}
            for value, gt_alpha, rot in zip(values, alpha, self.rotations):
                if value > best["psnr"]:
                    best = {"psnr": value, "mask_iou": mask_iou(ours.alpha, gt_alpha),
                            "variant": name, "rotation_deg": rot}
        return {**best, "variants": variants, "rgb": ours.rgb, "alpha": ours.alpha}


# -- the prior's vote ----------------------------------------------------------------------------
@torch.no_grad()
def prior_posterior(prior, x_t: torch.Tensor, t: float, cond: dict) -> torch.Tensor:
    """Softmax weights ``[B, N]`` of the conditional posterior over the dataset images for
    ``x_t [B,3,R,R]`` (the grey background: no re-compositing)."""
    B = x_t.shape[0]
    flat = x_t.reshape(B, -1).double()
    tt = torch.tensor(t, dtype=torch.float64)
    a, s2 = float(prior.schedule.alpha(tt)), float(prior.schedule.sigma(tt)) ** 2
    masks = torch.stack([prior.subset_mask(int(p), int(d))
                         for p, d in zip(cond["prompt"], cond["direction"])])
    score = (a * (flat @ prior.data.T) - 0.5 * a * a * prior.sq_norms[None]) / s2
    score = score.masked_fill(~masks, -torch.inf)
    return torch.softmax(score, -1)


# -- noise consistency ---------------------------------------------------------------------------
class KeepNoiseState:
    """Leave the run's noise as it was: its first call draws the screen-space background noise
    from the noise generator, which a measurement before the run's first step must not do."""

    def __init__(self, noise):
        self.noise = noise

    def __enter__(self):
        self.state = self.noise.generator.get_state()
        self.background = self.noise.background

    def __exit__(self, *exc):
        self.noise.generator.set_state(self.state)
        self.noise.background = self.background


def _surface(system, cams: Cameras):
    out = system.render_eval(cams)
    points = cams.centers[:, None, None, :] + out.depth * cams.ray_directions()
    return out, points


def _is_background(noise: torch.Tensor, background: Optional[torch.Tensor]) -> torch.Tensor:
    """Cells ``[B,h,w]`` whose noise is the screen-space background noise (own no texel)."""
    if background is None:
        return torch.zeros(noise.shape[0], *noise.shape[2:], dtype=torch.bool)
    return (noise == background[None]).all(1)


@torch.no_grad()
def noise_consistency(system, noise_fn=None, deltas=(10, 30, 60, 90), elevations=(0.0, 20.0),
                      n_azimuths: int = 8, distance: float = 2.5, fov: float = 40.0,
                      depth_tol: float = 0.04, args_aligned: float = 0.15) -> dict:
    """Correlation of the noise at one surface point seen from two views ``delta`` degrees
    apart in azimuth, on the scene's current surface.

    View 1's opaque pixels (alpha > 0.5) are lifted with their expected depth, projected into
    view 2, and kept where view 2 sees the same point (alpha > 0.5, its depth within
    ``depth_tol`` of the point's). The latent grid is the render's (the embedded prior works at
    64 px), so a pixel is a noise cell. Pearson correlation over the kept cells and channels,
    with cells left on the screen-space background noise (no texel) counted, and without, and
    over the pairs whose point lands within ``args_aligned`` cells of view 2's cell centre.
    """
    noise_fn = noise_fn or system.noise
    R, shape = system.cfg.resolution, system.latent_shape
    el = torch.tensor([e for e in elevations for _ in range(n_azimuths)], dtype=torch.float32)
    az = torch.tensor([360.0 * i / n_azimuths for _ in elevations for i in range(n_azimuths)])
    dist, fovs = torch.full_like(el, distance), torch.full_like(el, fov)
    cams1 = orbit_cameras(el, az, dist, fovs, R, R)
    out1, p1 = _surface(system, cams1)
    n1 = noise_fn(p1, out1.alpha, shape)
    bg1 = _is_background(n1, getattr(noise_fn, "background", None))
    result = {}
    for delta in deltas:
        cams2 = orbit_cameras(el, az + delta, dist, fovs, R, R)
        out2, p2 = _surface(system, cams2)
        n2 = noise_fn(p2, out2.alpha, shape)
        bg2 = _is_background(n2, getattr(noise_fn, "background", None))
        V = cams2.viewmats
        cam = torch.einsum("bij,bhwj->bhwi", V[:, :3, :3], p1) + V[:, None, None, :3, 3]
        z = cam[..., 2]
        K = cams2.Ks
        u = K[:, None, None, 0, 0] * cam[..., 0] / z + K[:, None, None, 0, 2]
        v = K[:, None, None, 1, 1] * cam[..., 1] / z + K[:, None, None, 1, 2]
        j, i = torch.floor(u).long(), torch.floor(v).long()
        inside = (out1.alpha[..., 0] > 0.5) & (z > 0) & (i >= 0) & (i < R) & (j >= 0) & (j < R)
        b = torch.arange(len(cams1))[:, None, None].expand_as(i)
        ii, jj = i.clamp(0, R - 1), j.clamp(0, R - 1)
        seen = (out2.alpha[b, ii, jj, 0] > 0.5) & ((out2.depth[b, ii, jj, 0] - z).abs() < depth_tol)
        keep = inside & seen
        x = n1.permute(0, 2, 3, 1)[keep]  # [K, C]
        y = n2.permute(0, 2, 3, 1)[b[keep], ii[keep], jj[keep]]
        fallback = bg1[keep] | bg2[b[keep], ii[keep], jj[keep]]
        surface = ~fallback
        # where the point lands within view 2's cell: near its centre the two cells' footprints
        # coincide up to the change of view; a random sub-cell offset alone halves the overlap
        # (the mean of (1-|dx|)(1-|dy|) is 0.56)
        offset = torch.maximum((u - j - 0.5).abs(), (v - i - 0.5).abs())[keep]
        aligned = surface & (offset < args_aligned)
        entry = {"pairs": int(keep.sum()), "opaque_view1": int((out1.alpha[..., 0] > 0.5).sum()),
                 "fallback_share": float(fallback.float().mean()) if keep.any() else float("nan"),
                 "corr": _corr(x, y), "corr_surface_only": _corr(x[surface], y[surface]),
                 "pairs_aligned": int(aligned.sum()), "corr_aligned": _corr(x[aligned], y[aligned])}
        result[str(delta)] = entry
    result["fallback_share_view1"] = float(bg1[out1.alpha[..., 0] > 0.5].float().mean())
    return result


def _corr(x: torch.Tensor, y: torch.Tensor) -> float:
    if x.numel() < 4:
        return float("nan")
    x, y = x.double().flatten(), y.double().flatten()
    x, y = x - x.mean(), y - y.mean()
    return float((x * y).sum() / (x.norm() * y.norm()).clamp_min(1e-12))


@torch.no_grad()
def temporal_noise(system, cams: Cameras) -> Dict[str, torch.Tensor]:
    """The run's noise (and opaque, textured cells) for fixed cameras, to correlate across
    steps."""
    out, points = _surface(system, cams)
    n = system.noise(points, out.alpha, system.latent_shape)
    ok = (out.alpha[..., 0] > 0.5) & ~_is_background(n, system.noise.background)
    return {"noise": n, "ok": ok}


# -- ceiling -------------------------------------------------------------------------------------
def _unit(elevation: torch.Tensor, azimuth: torch.Tensor) -> torch.Tensor:
    el, az = torch.deg2rad(elevation.double()), torch.deg2rad(azimuth.double())
    return torch.stack([el.cos() * az.cos(), el.cos() * az.sin(), el.sin()], -1)


def nearest_by_direction(cams: Cameras, directions: torch.Tensor):
    """For each of ``cams``, the index ``[B]`` of the nearest of ``directions [N,3]`` (unit
    vectors, ``_unit``) and the angle ``[B]`` to it in degrees (the distance is ignored, as the
    prior's view suffix ignores it)."""
    cos = (_unit(cams.elevation, cams.azimuth) @ directions.T).clamp(-1, 1)
    best = cos.max(-1)
    return best.indices, torch.rad2deg(torch.acos(best.values))


def _image_psnr(a: torch.Tensor, b: torch.Tensor) -> List[float]:
    """PSNR of each image pair ``[B,H,W,3]`` in [0,1]."""
    return [psnr(x, y) for x, y in zip(a, b)]


@torch.no_grad()
def _nearest_images(x: torch.Tensor, data: torch.Tensor, sq: torch.Tensor,
                    mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Index of the dataset image nearest in pixels to each ``x [B,3,R,R]`` in [-1,1]
    (within ``mask [B,N]``)."""
    flat = x.reshape(x.shape[0], -1).double()
    d = sq[None] - 2 * flat @ data.T
    if mask is not None:
        d = d.masked_fill(~mask, torch.inf)
    return d.argmin(-1)


@torch.no_grad()
def _ddim(prior, x: torch.Tensor, times: Sequence[float], cond, uncond, scale: float,
          up: bool = False) -> torch.Tensor:
    """Deterministic DDIM through ``times`` (the probability-flow ODE's first-order steps);
    ``up``: the inversion (times increasing)."""
    for t, t_next in zip(times[:-1], times[1:]):
        tt = torch.tensor(t, dtype=torch.float64)
        eps = prior.predict_eps(x, tt, cond, uncond, scale)
        a, s = float(prior.schedule.alpha(tt)), float(prior.schedule.sigma(tt))
        tn = torch.tensor(t_next, dtype=torch.float64)
        a_n, s_n = float(prior.schedule.alpha(tn)), float(prior.schedule.sigma(tn))
        x = a_n * (x - s * eps) / a + s_n * eps
    return x


@torch.no_grad()
def _x0(prior, x: torch.Tensor, t: float, cond, uncond, scale: float) -> torch.Tensor:
    tt = torch.tensor(t, dtype=torch.float64)
    eps = prior.predict_eps(x, tt, cond, uncond, scale)
    return (x - float(prior.schedule.sigma(tt)) * eps) / float(prior.schedule.alpha(tt))


def prior_pull(prior, x: torch.Tensor, gt: torch.Tensor, eps: torch.Tensor, t: float, cond,
               uncond, scale: float) -> float:
    """The prior's pull on a perfect reconstruction: mean PSNR of ``x0_hat(a x + s eps)`` (CFG
    ``scale``) against ``gt [B,H,W,3]``, for ``x [B,3,R,R]`` its encoding."""
    x_t = prior.schedule.add_noise(x, eps, torch.tensor(t, dtype=torch.float64))
    x0 = _x0(prior, x_t, t, cond, uncond, scale)
    return float(np.mean(_image_psnr(prior.decode(x0), gt)))


@torch.no_grad()
def cmd_ceiling(args) -> None:
    from cfd.systems.prior import build_guidance
    from guidance.prompts import PromptProcessor

    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    c = load_settings([f"prompt_processor.prompt={args.prompt}", *args.overrides])
    prior = build_guidance(c.guidance, torch.device("cpu"), c.prompt_processor)
    prompt = PromptProcessor(c.prompt_processor, prior)
    meta = _dataset_meta(c)
    objs = objects_for(c.prompt_processor.prompt)
    scale = c.guidance.guidance_scale
    gen = torch.Generator().manual_seed(args.seed)
    cams = c.camera.sample(args.cameras, c.resolution, gen, "cpu")
    eval_cams = fixed_orbit_cameras(8, c.resolution, c.resolution, 20.0, 2.5, 40.0)
    ds_dir = _unit(meta["elevation"], meta["azimuth"])
    result = {"config": {"cameras": args.cameras, "guidance_scale": scale, "steps": c.steps,
                         "knots": c.timesteps.knots, "seed": args.seed},
              "variants": {}}
    from cfd.systems.timesteps import TimestepSchedule
    sched = TimestepSchedule(c.timesteps, c.steps)
    schedule_t = [sched(k, None) for k in range(c.steps)]
    obj_names = meta["objects"]
    pictures, batches = {}, []
    for obj in objs:
        k = obj_names.index(obj.name)
        mask_obj = meta["object_index"] == k
        target = object_splats(obj)
        entry = {}
        for label, cm in (("train", cams), ("eval", eval_cams)):
            gt = render(target, cm, background=c.background).rgb
            nearest, angle = nearest_by_direction(cm, ds_dir[mask_obj])
            ids = torch.nonzero(mask_obj)[:, 0][nearest]
            ratio = cm.distance.double() / meta["distance"][ids].double()
            img = meta["rgb"][ids].float() / 255.0
            p_cam = _image_psnr(img, gt)
            # what the prior returns at t -> 0: the image nearest in pixels among the condition's
            x = prior.encode(gt)
            cond, uncond = prompt(cm.elevation, cm.azimuth)
            masks = torch.stack([prior.subset_mask(int(p), int(d))
                                 for p, d in zip(cond["prompt"], cond["direction"])])
            pix = _nearest_images(x, prior.data, prior.sq_norms, masks)
            p_pix = _image_psnr(meta["rgb"][pix].float() / 255.0, gt)
            pix_angle = torch.rad2deg(torch.acos((_unit(cm.elevation, cm.azimuth)
                                                  * ds_dir[pix]).sum(-1).clamp(-1, 1)))
            entry[label] = {"nearest_camera_deg": angle.tolist(),
                            "distance_ratio": ratio.tolist(),
                            "psnr_nearest_camera_image": p_cam,
                            "psnr_nearest_pixel_image": p_pix,
                            "nearest_pixel_object": [obj_names[int(meta["object_index"][i])]
                                                     for i in pix],
                            "nearest_pixel_camera_deg": pix_angle.tolist()}
            if label == "train":
                gt_train, x_train, cond_train, uncond_train = gt, x, cond, uncond
        # the prior's pull on a perfect reconstruction: x0_hat(a gt + s eps) against gt
        n = args.pull_cameras
        eps = torch.randn(x_train[:n].shape, generator=gen)
        pull = {}
        for t in args.pull_t:
            pull[str(t)] = {f"cfg{g:g}": prior_pull(prior, x_train[:n], gt_train[:n], eps, t,
                                                   select_cond(cond_train, n),
                                                   select_cond(uncond_train, n), g)
                            for g in sorted({1.0, scale})}
            print(obj.name, "pull", t, pull[str(t)], flush=True)
        entry["pull"] = pull
        result["variants"][obj.name] = entry
        summary = {lab: {"median_angle": float(np.median(entry[lab]["nearest_camera_deg"])),
                         "median_psnr_cam": float(np.median(entry[lab]["psnr_nearest_camera_image"])),
                         "median_psnr_pix": float(np.median(entry[lab]["psnr_nearest_pixel_image"]))}
                   for lab in ("train", "eval")}
        print(obj.name, summary, flush=True)
        batches.append((obj, gt_train, x_train, cond_train, uncond_train, eps, mask_obj))
    # the 2D ODE with the run's schedule, CFG and steps, every variant in one batch: from the
    # render noised to the first t (noise seeded), and from the render's DDIM inversion
    m, inv_n = args.ode_cameras, args.inversion_cameras
    cat = lambda key, n: {k: torch.cat([b[key][k][:n] for b in batches_d]) for k in batches_d[0][key]}  # noqa: E731
    batches_d = [{"cond": b[3], "uncond": b[4]} for b in batches]
    x_inv = torch.cat([b[2][:inv_n] for b in batches])
    t0 = time.perf_counter()
    noise_inv = _ddim(prior, x_inv, list(reversed(schedule_t)), cat("cond", inv_n),
                      cat("uncond", inv_n), scale, up=True)
    print("inversion", time.perf_counter() - t0, "s", flush=True)
    t_first = torch.tensor(schedule_t[0], dtype=torch.float64)
    starts = torch.cat([prior.schedule.add_noise(b[2][:m], b[5][:m], t_first) for b in batches]
                       + [noise_inv])
    cond_all = {k: torch.cat([cat("cond", m)[k], cat("cond", inv_n)[k]]) for k in batches_d[0]["cond"]}
    uncond_all = {k: torch.cat([cat("uncond", m)[k], cat("uncond", inv_n)[k]])
                  for k in batches_d[0]["uncond"]}
    t0 = time.perf_counter()
    x_end = _ddim(prior, starts, schedule_t, cond_all, uncond_all, scale)
    images = prior.decode(_x0(prior, x_end, schedule_t[-1], cond_all, uncond_all, scale))
    print("ODE", time.perf_counter() - t0, "s", flush=True)
    V = len(batches)
    for v, b in enumerate(batches):
        obj, gt_train, mask_obj = b[0], b[1], b[6]
        entry = result["variants"][obj.name]
        ode = images[v * m:(v + 1) * m]
        inv = images[V * m + v * inv_n: V * m + (v + 1) * inv_n]
        for key, imgs, cnt in (("ode_noised_start", ode, m), ("ode_from_inversion", inv, inv_n)):
            xi = prior.encode(imgs)
            near = _nearest_images(xi, prior.data, prior.sq_norms)
            near_angle = torch.rad2deg(torch.acos((_unit(cams.elevation[:cnt], cams.azimuth[:cnt])
                                                   * ds_dir[near]).sum(-1).clamp(-1, 1)))
            entry[key] = {"psnr_to_render": _image_psnr(imgs, gt_train[:cnt]),
                          "reached_object": [obj_names[int(meta["object_index"][i])] for i in near],
                          "reached_camera_deg": near_angle.tolist(),
                          "reached_azimuth_error": [float((meta["azimuth"][i] - a + 180) % 360 - 180)
                                                    for i, a in zip(near, cams.azimuth[:cnt])],
                          "psnr_to_reached_image": _image_psnr(
                              imgs, meta["rgb"][near].float() / 255.0)}
        entry["ode_from_inversion"]["inverted_noise_std"] = float(
            noise_inv[v * inv_n:(v + 1) * inv_n].std())
        ids_cam = torch.nonzero(mask_obj)[:, 0][nearest_by_direction(cams[:m], ds_dir[mask_obj])[0]]
        pictures[obj.name] = torch.stack([gt_train[:m], ode,
                                          meta["rgb"][ids_cam].float() / 255.0]).numpy()
        pictures[obj.name + "_inversion"] = torch.stack([gt_train[:inv_n], inv]).numpy()
        print(obj.name, {k: (np.round(entry[k]["psnr_to_render"], 2).tolist(),
                             entry[k]["reached_object"],
                             np.round(entry[k]["reached_azimuth_error"], 1).tolist())
                         for k in ("ode_noised_start", "ode_from_inversion")}, flush=True)
    np.savez_compressed(out_dir / "pictures.npz", **pictures)
    (out_dir / "ceiling.json").write_text(json.dumps(result, indent=1))


def cmd_ceilings(args) -> None:
    """The per-view ceiling of every prompt's variants at several dataset densities: for
    training cameras, the ground truth rendered from the nearest of ``n`` cameras drawn as the
    dataset draws them (direction only, as the prior's view suffix does), against the ground
    truth from the camera itself; and, with ``--pull-cameras``, the configured prior's pull on a
    perfect reconstruction (``x0_hat`` of the noised ground truth, CFG as configured)."""
    from cfd.shapes.dataset import dataset_cameras
    from cfd.systems.prior import build_guidance
    from guidance.prompts import PromptProcessor

    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    c = load_settings(args.overrides)
    prior = (build_guidance(c.guidance, torch.device("cpu"), c.prompt_processor)
             if args.pull_cameras else None)
    result = {"config": {"cameras": args.cameras, "views": args.views, "seed": args.seed,
                         "pull_t": args.pull_t, "guidance_scale": c.guidance.guidance_scale,
                         "prior_views_per_object": c.guidance.dataset.views_per_object,
                         "camera_distance_range": c.camera.distance_range,
                         "dataset_distance_range": c.guidance.dataset.distance_range},
              "variants": {}}
    for text in args.prompts:
        c.prompt_processor.prompt = text
        prompt = PromptProcessor(c.prompt_processor, prior) if prior is not None else None
        for obj in objects_for(text):
            gen = torch.Generator().manual_seed(args.seed)
            cams = c.camera.sample(args.cameras, c.resolution, gen, "cpu")
            target = object_splats(obj)
            gt = render(target, cams, background=c.background).rgb
            entry = {"prompt": text, "nearest_camera": {}}
            for n in args.views:
                ds = dataset_cameras(c.guidance.dataset, n, torch.Generator().manual_seed(n))
                nearest, angle = nearest_by_direction(cams, _unit(ds.elevation, ds.azimuth))
                views = render(target, ds[nearest], background=c.background).rgb
                entry["nearest_camera"][str(n)] = {
                    "median_deg": float(angle.median()),
                    "median_psnr": float(np.median(_image_psnr(views, gt)))}
            if prior is not None:
                m = args.pull_cameras
                x = prior.encode(gt[:m])
                cond, uncond = prompt(cams.elevation[:m], cams.azimuth[:m])
                eps = torch.randn(x.shape, generator=gen)
                entry["pull"] = {str(t): prior_pull(prior, x, gt[:m], eps, t, cond, uncond,
                                                    c.guidance.guidance_scale)
                                 for t in args.pull_t}
            result["variants"][obj.name] = entry
            print(obj.name, json.dumps(entry), flush=True)
    (out_dir / "ceilings.json").write_text(json.dumps(result, indent=1))


def select_cond(cond: dict, n: int) -> dict:
    return {k: v[:n] for k, v in cond.items()}


# -- run -----------------------------------------------------------------------------------------
def cmd_run(args) -> None:
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    c = load_settings([f"seed={args.seed}", f"prompt_processor.prompt={args.prompt}",
                       *args.overrides])
    system = Distillation(c)
    truth = TruthCache(c.prompt_processor.prompt, c.resolution, c.background)
    prior = system.guidance
    names = [o.name for o in objects_for(c.prompt_processor.prompt)]
    meta = _dataset_meta(c)
    object_index = meta["object_index"]
    obj_names = meta["objects"]
    eval_cond, _ = system.prompt(truth.cams.elevation, truth.cams.azimuth)
    temporal_cams = orbit_cameras(torch.full((8,), 20.0), torch.arange(8) * 45.0,
                                  torch.full((8,), 2.5), torch.full((8,), 40.0),
                                  c.resolution, c.resolution)
    consistency_steps = set(args.consistency_steps)
    records, evals, consistency, temporal = [], [], [], []
    progress = {}
    previous = None
    measure_s, start = 0.0, time.perf_counter()
    for step in range(c.steps + 1):
        if step % args.every == 0 or step == c.steps:
            m0 = time.perf_counter()
            guard = KeepNoiseState(system.noise)
            guard.__enter__()
            ev = truth.evaluate(system.scene.scene, system.scene.render_options())
            t = system.schedule(min(step, c.steps - 1), None)
            # what the prior votes for from the held-out views at this step's t, with the run's
            # own (consistent) noise on the grey background
            out, points = _surface(system, truth.cams)
            noise = system.noise(points, out.alpha, system.latent_shape)
            x0 = prior.encode(out.rgb)
            x_t = prior.schedule.add_noise(x0, noise, torch.tensor(t, dtype=torch.float64))
            w = prior_posterior(prior, x_t, t, eval_cond)
            mass = {obj_names[k]: float(w[:, object_index == k].sum(1).mean())
                    for k in range(len(obj_names)) if obj_names[k] in names}
            top = w.argmax(1)
            az_err = (meta["azimuth"][top] - truth.cams.azimuth + 180) % 360 - 180
            entry = {"step": step, "t": t, **{k: ev[k] for k in ("psnr", "mask_iou", "variant",
                                                                     "rotation_deg")},
                     "variants": ev["variants"], "prior_mass": mass,
                     "prior_top_object": [obj_names[int(object_index[k])] for k in top],
                     "prior_top_azimuth_error": [float(a) for a in az_err]}
            evals.append(entry)
            progress[step] = (ev["rgb"].clamp(0, 1) * 255 + 0.5).to(torch.uint8).numpy()
            if step in consistency_steps or step == c.steps:
                cons = noise_consistency(system)
                cons["step"] = step
                consistency.append(cons)
                now = temporal_noise(system, temporal_cams)
                if previous is not None:
                    ok = now["ok"] & previous[1]["ok"]
                    a = now["noise"].permute(0, 2, 3, 1)[ok]
                    b = previous[1]["noise"].permute(0, 2, 3, 1)[ok]
                    temporal.append({"from": previous[0], "to": step, "corr": _corr(a, b),
                                     "analytic_texture_corr":
                                         _texture_corr(c.noise.gamma, previous[0], step)})
                previous = (step, now)
            guard.__exit__()
            measure_s += time.perf_counter() - m0
            print(f"step {step}: t {t:.3f} psnr {ev['psnr']:.2f} {ev['variant']} rot "
                  f"{ev['rotation_deg']:.0f} | " + " ".join(
                      f"{k} {v['best_psnr']:.2f}@{v['best_rotation']:.0f} r0 {v['psnr_rot0']:.2f}"
                      for k, v in ev["variants"].items()) + f" | mass {mass}", flush=True)
        if step == c.steps:
            break
        records.append(system.train_step())
    wall = time.perf_counter() - start
    final = evaluate_against_shape_world(system.scene.scene, c.prompt_processor.prompt,
                                         resolution=c.resolution, background=c.background,
                                         render_options=system.scene.render_options())
    assert final["psnr"] == evals[-1]["psnr"] and final["variant"] == evals[-1]["variant"], \
        (final, evals[-1]["psnr"])
    # noise texture resolution and layout on the final geometry (the improvement half's options)
    sweep = {}
    for res, maps, shells in ((64, 3, 2), (256, 3, 2), (1024, 3, 2), (256, 6, 4))[:args.sweep]:
        cfg = NoiseConfig(texture_resolution=res, n_maps=maps, n_shells=shells)
        alt = ConsistentNoise(cfg, system.latent_shape[0], "cpu", seed=123)
        sweep[f"R{res}_maps{maps}_shells{shells}"] = noise_consistency(system, alt)
    system.scene.scene.save_ply(out_dir / "splats.ply")
    np.savez_compressed(out_dir / "progress.npz",
                        **{f"step_{k:05d}": v for k, v in progress.items()})
    result = {"seed": args.seed, "prompt": c.prompt_processor.prompt, "steps": c.steps,
              "overrides": args.overrides, "threads": torch.get_num_threads(),
              "wall_s": wall, "measure_s": measure_s, "final": final, "evals": evals,
              "consistency": consistency, "temporal": temporal, "texture_sweep": sweep,
              "records": records}
    (out_dir / "run.json").write_text(json.dumps(result, indent=1))
    print(f"final {final}; {wall:.0f} s ({measure_s:.0f} s measuring)")


def _texture_corr(gamma, step_a: int, step_b: int) -> float:
    """Correlation of a texel between two steps under the refresh
    ``eps <- sqrt(1-g) eps + sqrt(g) xi`` applied after each step in [step_a, step_b)."""
    from cfd.systems.common import scheduled
    return float(np.prod([math.sqrt(1 - scheduled(gamma, s)) for s in range(step_a, step_b)]))


def _dataset_meta(c) -> dict:
    from safetensors.torch import load_file

    from cfd.shapes.dataset import build_shape_dataset
    folder = build_shape_dataset(c.guidance.dataset)
    meta = json.loads((folder / "meta.json").read_text())
    t = load_file(str(folder / "images.safetensors"))
    return {"objects": meta["objects"], "object_index": t["object_index"].long(),
            "elevation": t["elevation"].float(), "azimuth": t["azimuth"].float(),
            "distance": t["distance"].float(), "rgb": t["rgb"], "alpha": t["alpha"]}


# -- selfcheck: the measurements leave the run bit-identical -------------------------------------
def cmd_selfcheck(args) -> None:
    c = load_settings([f"seed={args.seed}", f"steps={args.steps}"])
    plain = Distillation(c)
    for _ in range(args.steps // 2):
        plain.train_step()
    rec_plain = [plain.train_step() for _ in range(args.steps - args.steps // 2)]
    probed = Distillation(c)
    truth = TruthCache(c.prompt_processor.prompt, c.resolution, c.background, rotation_step=90)
    def probe():
        with KeepNoiseState(probed.noise):
            truth.evaluate(probed.scene.scene)
            noise_consistency(probed)
            temporal_noise(probed, truth.cams)

    probe()  # before the first step: the noise's background is not drawn yet
    for _ in range(args.steps // 2):
        probed.train_step()
    probe()
    rec_probed = [probed.train_step() for _ in range(args.steps - args.steps // 2)]
    a, b = plain.state_dict(), probed.state_dict()
    same = all(torch.equal(a["scene"]["params"][k], b["scene"]["params"][k])
               for k in a["scene"]["params"])
    same &= torch.equal(a["noise"]["textures"], b["noise"]["textures"])
    same &= torch.equal(a["torch_rng"], b["torch_rng"])
    same &= torch.equal(a["generator"], b["generator"])
    same &= rec_plain == rec_probed
    print(f"bit-identical after {args.steps} steps with measurements at steps 0 and {args.steps // 2}: "
          f"{same}")
    if not same:
        raise SystemExit(1)


# -- plots ---------------------------------------------------------------------------------------
@torch.no_grad()
def reference_consistency(prompt: str = "a mug") -> dict:
    """``noise_consistency`` on the ground-truth objects' surfaces, with the run config's noise
    and with 512^2 textures: what the per-cell noise can reach on a settled, opaque surface."""
    from types import SimpleNamespace

    c = load_settings([])
    out = {}
    for obj in objects_for(prompt):
        target = object_splats(obj)
        for res in (c.noise.texture_resolution, 512):
            cfg = NoiseConfig(texture_resolution=res, n_maps=c.noise.n_maps,
                              n_shells=c.noise.n_shells)
            fake = SimpleNamespace(
                cfg=c, latent_shape=(3, c.resolution, c.resolution),
                noise=ConsistentNoise(cfg, 3, "cpu", seed=7),
                render_eval=lambda cams, t=target: render(t, cams, background=c.background))
            out[f"{obj.name}_R{res}"] = noise_consistency(fake)
    return out


def plot_ceilings(plt, labelled: Sequence[Sequence[str]], path: Path) -> None:
    """The per-view ceiling against the dataset's views an object, one colour per
    ``(label, ceilings.json)``: a thin line per variant, the median over variants bold."""
    fig, ax = plt.subplots(figsize=(7, 4.5))
    cameras = set()
    for i, (label, json_path) in enumerate(labelled):
        result = json.loads(Path(json_path).read_text())
        variants = result["variants"]
        cameras.add(result["config"]["cameras"])
        views = sorted({int(v) for e in variants.values() for v in e["nearest_camera"]})
        table = np.array([[e["nearest_camera"][str(v)]["median_psnr"] for v in views]
                          for e in variants.values()])
        for row in table:
            ax.plot(views, row, color=f"C{i}", lw=0.6, alpha=0.4)
        ax.plot(views, np.median(table, 0), "o-", color=f"C{i}", lw=2.5,
                label=f"{label} (median of {len(variants)} variants)")
    ax.set_xscale("log")
    ax.minorticks_off()
    ax.set_xticks(views, [str(v) for v in views])
    ax.set_xlabel("dataset views an object")
    ax.set_ylabel("PSNR, nearest dataset camera's view to the view (dB)")
    ax.set_title("Per-view ceiling: the ground truth from the nearest dataset camera\n"
                 "(by direction) against it from the training camera, median of "
                 f"{'/'.join(map(str, sorted(cameras)))} cameras", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def cmd_plot(args) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig_dir = Path(args.figures)
    fig_dir.mkdir(parents=True, exist_ok=True)
    if args.ceilings:
        plot_ceilings(plt, [entry.split("=", 1) for entry in args.ceilings],
                      fig_dir / "issue22_distance_ceiling.png")
    runs = {json.loads((Path(r) / "run.json").read_text())["seed"]: Path(r) for r in args.runs}
    data = {seed: json.loads((path / "run.json").read_text()) for seed, path in runs.items()}
    deltas = ["10", "30", "60", "90"]
    if data:
        ref = reference_consistency()
        # 1. consistency during the runs
        fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
        colours = dict(zip(deltas, ("C0", "C1", "C2", "C3")))
        for seed, r in sorted(data.items()):
            style = "-" if seed == 0 else "--"
            steps = [e["step"] for e in r["consistency"]]
            for d in deltas:
                axes[0].plot(steps, [e[d]["corr"] for e in r["consistency"]], style,
                             color=colours[d], label=f"{d} deg, seed {seed}")
                axes[1].plot(steps, [e[d]["corr_aligned"] for e in r["consistency"]], style,
                             color=colours[d], label=f"{d} deg, seed {seed}")
            axes[2].plot([e["to"] for e in r["temporal"]], [e["corr"] for e in r["temporal"]],
                         style + "o", color="k", label=f"measured, seed {seed}")
        any_run = next(iter(data.values()))
        axes[2].plot([e["to"] for e in any_run["temporal"]],
                     [e["analytic_texture_corr"] for e in any_run["temporal"]], ":s",
                     color="C3", label="textures alone (gamma refresh)")
        for ax_i, key in ((0, "corr"), (1, "corr_aligned")):
            for d in deltas:
                for name, rr in ref.items():
                    if name.endswith("_R512") and name.startswith("mug_red"):
                        axes[ax_i].axhline(rr[d][key], color=colours[d], lw=0.8, alpha=0.6,
                                           ls=":")
            axes[ax_i].axhline(0.8, color="k", lw=1, ls="-.")
            axes[ax_i].set_xlabel("step")
            axes[ax_i].set_ylim(-0.05, 1.0)
        axes[0].set_title("noise correlation, same surface point\n(dotted: ground-truth mug, "
                          "512^2 textures; dash-dot: goal 0.8)", fontsize=9)
        axes[1].set_title("same, pairs landing within 0.15 cell of\nthe other view's cell centre",
                          fontsize=9)
        axes[2].set_title("same camera, noise at step k vs the previous\nmeasured step",
                          fontsize=9)
        axes[0].legend(fontsize=6, ncol=2)
        axes[2].legend(fontsize=7)
        axes[2].set_xlabel("step")
        fig.tight_layout()
        fig.savefig(fig_dir / "issue22_consistency.png", dpi=80)
        plt.close(fig)
        (fig_dir / "issue22_reference_consistency.json").write_text(json.dumps(ref, indent=1))
        # 2. PSNR per step and the decision
        fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
        for seed, r in sorted(data.items()):
            style = "-" if seed == 0 else "--"
            steps = [e["step"] for e in r["evals"]]
            axes[0].plot(steps, [e["psnr"] for e in r["evals"]], style, color="k",
                         label=f"seed {seed}: best")
            for vi, name in enumerate(r["evals"][0]["variants"]):
                axes[0].plot(steps, [e["variants"][name]["psnr_rot0"] for e in r["evals"]],
                             style, color=f"C{vi}", alpha=0.7,
                             label=f"seed {seed}: {name}, rotation 0")
                axes[1].plot(steps, [e["prior_mass"][name] for e in r["evals"]], style,
                             color=f"C{vi}", label=f"seed {seed}: {name}")
            axes[2].plot(steps, [(e["rotation_deg"] + 180) % 360 - 180 for e in r["evals"]],
                         style + "o", color="k", ms=3, label=f"seed {seed}: best rotation")
            axes[2].plot(steps, [float(np.mean(np.abs(e["prior_top_azimuth_error"])))
                                 for e in r["evals"]], style, color="C3",
                         label=f"seed {seed}: prior's top image, mean |azimuth error|")
        axes[0].axhline(25, color="grey", lw=0.8, ls=":")
        axes[0].set_title("held-out PSNR against the ground truth", fontsize=9)
        axes[1].set_title("prior's posterior mass per variant\n(held-out views, run's noise and t)",
                          fontsize=9)
        axes[2].set_title("orientation: best-matching rotation (deg),\nprior's retrieved azimuth "
                          "error", fontsize=9)
        for ax in axes:
            ax.set_xlabel("step")
            ax.legend(fontsize=6)
        fig.tight_layout()
        fig.savefig(fig_dir / "issue22_psnr_per_step.png", dpi=80)
        plt.close(fig)
        # 3. progress side by side
        saved = set.intersection(*[{int(k[5:]) for k in np.load(runs[seed] / "progress.npz")}
                                   for seed in data])
        show = [k for k in (0, 50, 100, 150, 200, 300, 400, 600) if k in saved] or sorted(saved)
        rows = []
        for step in show:
            cols = []
            for seed in sorted(data):
                arr = np.load(runs[seed] / "progress.npz")[f"step_{step:05d}"][::2]  # 4 views
                cols.append(np.concatenate(list(arr), 1))
                cols.append(np.full((arr.shape[1], 6, 3), 255, np.uint8))
            rows.append(np.concatenate(cols[:-1], 1))
        grid = np.concatenate(rows, 0)
        fig, ax = plt.subplots(figsize=(grid.shape[1] / 40, grid.shape[0] / 40 + 0.6))
        ax.imshow(grid, interpolation="nearest")
        ax.set_yticks([64 * i + 32 for i in range(len(show))], [f"step {s}" for s in show],
                      fontsize=7)
        ax.set_xticks([128 + 262 * i for i in range(len(data))],
                      [f"seed {s} (az 0, 90, 180, 270)" for s in sorted(data)], fontsize=8)
        fig.tight_layout()
        fig.savefig(fig_dir / "issue22_progress.png", dpi=80)
        plt.close(fig)
    if args.ceiling:
        r = json.loads((Path(args.ceiling) / "ceiling.json").read_text())
        pics = np.load(Path(args.ceiling) / "pictures.npz")
        fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
        for vi, (name, e) in enumerate(r["variants"].items()):
            axes[0].hist(e["train"]["nearest_camera_deg"], bins=20, alpha=0.6, color=f"C{vi}",
                         label=name)
            axes[1].scatter(e["train"]["nearest_camera_deg"],
                            e["train"]["psnr_nearest_camera_image"], s=6, color=f"C{vi}",
                            label=name)
            ts = [float(t) for t in e["pull"]]
            for key, style in (("cfg1", ":"), (f"cfg{r['config']['guidance_scale']:g}", "-")):
                axes[2].plot(ts, [e["pull"][str(t)][key] for t in e["pull"]], style + "o",
                             color=f"C{vi}", ms=3, label=f"{name}, {key}")
        axes[0].set_title("nearest dataset camera of each training camera (deg)", fontsize=9)
        axes[1].set_title("PSNR of that dataset image to the ground-truth render", fontsize=9)
        axes[1].set_xlabel("angle to nearest dataset camera (deg)")
        axes[2].set_title("pull on a perfect reconstruction:\nPSNR(x0_hat(a gt + s eps), gt)",
                          fontsize=9)
        axes[2].set_xlabel("t")
        axes[2].invert_xaxis()
        for ax in axes:
            ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(fig_dir / "issue22_ceiling.png", dpi=80)
        plt.close(fig)
        rows = []
        for name in r["variants"]:
            p = pics[name]  # [3, m, H, W, 3]: render, ODE result, nearest-camera dataset image
            rows.append(np.concatenate([np.concatenate(list(p[k]), 1) for k in range(3)], 0))
        grid = (np.concatenate(rows, 1) * 255 + 0.5).clip(0, 255).astype(np.uint8)
        inv = [pics[n + "_inversion"] for n in r["variants"]]
        inv_grid = (np.concatenate([np.concatenate(list(np.concatenate(list(p), 2)), 0)
                                    for p in inv], 1) * 255 + 0.5).clip(0, 255).astype(np.uint8)
        fig, axes = plt.subplots(1, 2, figsize=(12, 3.2),
                                 gridspec_kw={"width_ratios": [grid.shape[1], inv_grid.shape[1]]})
        axes[0].imshow(grid, interpolation="nearest")
        axes[0].set_title("rows: ground-truth render, 2D ODE from it noised to t=0.98, "
                          "nearest-camera dataset image", fontsize=8)
        axes[1].imshow(inv_grid, interpolation="nearest")
        axes[1].set_title("render (top) and ODE from its inversion (bottom)", fontsize=8)
        for ax in axes:
            ax.axis("off")
        fig.tight_layout()
        fig.savefig(fig_dir / "issue22_ceiling_ode.png", dpi=80)
        plt.close(fig)
    for path in sorted(fig_dir.glob("issue22_*")):
        print(path, path.stat().st_size // 1024, "KB")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("run")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--prompt", default="a mug")
    p.add_argument("--every", type=int, default=25)
    p.add_argument("--consistency-steps", type=int, nargs="+",
                   default=[0, 25, 50, 100, 150, 200, 300, 400, 500])
    p.add_argument("--out", required=True)
    p.add_argument("--sweep", type=int, default=4,
                   help="texture layouts tried on the final geometry (the third, 1024^2, "
                        "needs about 2 GB)")
    p.add_argument("overrides", nargs="*")
    p = sub.add_parser("selfcheck")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=20)
    p = sub.add_parser("ceiling")
    p.add_argument("--prompt", default="a mug")
    p.add_argument("--cameras", type=int, default=256)
    p.add_argument("--ode-cameras", type=int, default=4)
    p.add_argument("--inversion-cameras", type=int, default=2)
    p.add_argument("--pull-cameras", type=int, default=16)
    p.add_argument("--pull-t", type=float, nargs="+",
                   default=[0.98, 0.8, 0.6, 0.4, 0.3, 0.2, 0.1, 0.05, 0.02])
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--out", required=True)
    p.add_argument("overrides", nargs="*")
    p = sub.add_parser("ceilings")
    p.add_argument("--prompts", nargs="+",
                   default=list(dict.fromkeys(o.prompt for o in SHAPE_WORLD)),
                   help="default: every named object's prompt")
    p.add_argument("--cameras", type=int, default=128)
    p.add_argument("--views", type=int, nargs="+", default=[300, 1200, 4800])
    p.add_argument("--pull-cameras", type=int, default=0,
                   help="training cameras for the prior's pull (0: no prior is built)")
    p.add_argument("--pull-t", type=float, nargs="+", default=[0.6, 0.2, 0.02])
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--out", required=True)
    p.add_argument("overrides", nargs="*")
    p = sub.add_parser("plot")
    p.add_argument("--runs", nargs="+", default=[])
    p.add_argument("--ceiling", default=None)
    p.add_argument("--figures", default=str(FIGURES))
    p.add_argument("--ceilings", nargs="*", default=[],
                   help="LABEL=path/ceilings.json entries of the `ceilings` command")
    args = parser.parse_args()
    tune_malloc()
    {"run": cmd_run, "selfcheck": cmd_selfcheck, "ceiling": lambda a: cmd_ceiling(a),
     "ceilings": cmd_ceilings,
     "plot": lambda a: cmd_plot(a)}[args.cmd](args)


if __name__ == "__main__":
    main()
