"""The amodal benchmark: RelaxFlow and its ablations on occluded held-out shapes, with ground truth.

    python benchmarks/bench_amodal.py cases benchmarks/amodal_cases.json [--per-category-band 2]
        [--known]
    python benchmarks/bench_amodal.py run OUT [--cases benchmarks/amodal_cases.json]
        [--methods relaxflow,flat,...] [--stride K] [--offset I] [--limit N]
        [--model embedded]
    python benchmarks/bench_amodal.py report OUT [--also OUT2 ...]
    python benchmarks/bench_amodal.py refine OUT [--steps 300] [--stride K] [--offset I]
        [--limit N] [--model embedded] [--refine-overrides key=value ...]

``cases`` draws the fixed case list (``cfd.evaluation.amodal.make_cases``: every category x
the three hidden-share bands, seeded); ``--known`` draws them from the instances the embedded
prior knows instead (each category's variants, ``cfd.shapes.catalogue``; one case per band,
categories with named members left out): ``benchmarks/amodal_cases_known.json``, where refine's
guidance points at the instance itself rather than at another member of its category. ``run``
writes each case's observation and visible mask and runs the ``relaxflow`` job on it once per
method (:data:`METHODS`: overrides of ``configs/relaxflow-embedded.yaml``; the same seed, so
the same noise, for every method), in this process, exactly as a user would; every relaxflow
run also gives the two single branches (observation only, prior only) from the same noise.
Each result is scored at once and appended to ``OUT/results.jsonl`` (a stopped run continues
where it stopped: done (case, method) pairs are skipped). ``report`` writes ``OUT/report.md``
(means with 95% intervals per band; the paper's four claims checked) and ``OUT/grid.png``.

``refine`` measures the stack on the same cases: RelaxFlow's completion alone, CFD from scratch
(the prompt only, ``configs/cfd-splats-embedded.yaml``, ``--steps``), ``refine``
(``configs/refine-embedded.yaml``: the completion seeds CFD, visible splats locked) with the same
steps and with a third of them. Scores: PSNR and mask IoU from 8 views around against the
instance, and visible fidelity at the observation camera. Issue 20's goals: refine ends above
both, keeps visible fidelity within 1 dB of its completion, and with a third of the steps reaches
CFD-from-scratch's PSNR. Results in ``OUT/refine.jsonl``, summary in ``OUT/refine.md``, each
case's results against its completion in ``OUT/refine.png``.

Scores (``cfd.evaluation``): voxel IoU with the analytic occupancy, overall and in the hidden
region (the ground truth's cells the observation does not show); Chamfer distance and F-score
(tau 0.05) of surface samples, overall and hidden; text adherence on the ambiguous cases (is the
result's nearest category, by Chamfer to 3 training instances of each, its own rather than one
sharing the visible parts); visible fidelity (PSNR and mask IoU at the observation camera inside
the visible mask); PSNR and mask IoU from 8 views around; wall time per branch.
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
import time
from pathlib import Path
from typing import Any, Dict, List

import numpy as np
import torch
from matplotlib.figure import Figure
from PIL import Image, ImageDraw

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from cfd.cameras import orbit_cameras  # noqa: E402
from cfd.config import load_config  # noqa: E402
from cfd.evaluation import (chamfer_distance, confidence_interval, f_score, mask_iou,  # noqa: E402
                            nearest_category, psnr, restrict_to_region, splat_surface_points,
                            voxel_iou)
from cfd.evaluation.amodal import (AmodalCase, generator_camera, hidden_points,  # noqa: E402
                                   hidden_region, make_cases, observe)
from cfd.evaluation.generation import cameras_around, to_world, view_scores  # noqa: E402
from cfd.renderers import render  # noqa: E402
from cfd.scene import Splats  # noqa: E402
from cfd.shapes import (category, object_splats, occupancy_grid, train_seeds,  # noqa: E402
                        variant_categories, variant_seeds)
from cfd.shapes.categories import surface_points  # noqa: E402
from jobs import distill, refine, relaxflow  # noqa: E402

CONFIG = ROOT / "configs" / "relaxflow-embedded.yaml"
# The paper's RelaxFlow, whatever CONFIG's defaults become: every method is it plus its own
# overrides (the ablations are of the paper's method)
PAPER = ["stage1.sigma_query=2.5", "stage1.sigma_key=2.5", "stage1.topology=grid"]
# name -> overrides of CONFIG after PAPER; each run also yields observation_only and prior_only
METHODS: Dict[str, List[str]] = {
    "relaxflow": [],
    "flat": ["stage1.topology=flat"],
    "no_blur": ["stage1.sigma_query=0.0", "stage1.sigma_key=0.0"],
    "no_mask": ["camera.enabled=false"],
    "priors_1": ["generate_priors.n_images=1"],
    "priors_5": ["generate_priors.n_images=5"],
    "mean_pooling": ["prior_pooling=mean"],
    "stage2_blur": ["stage2.sigma_query=2.5", "stage2.sigma_key=2.5"],
    "cosine": ["stage1.schedule=cosine", "stage2.schedule=cosine"],
    "sigmoid": ["stage1.schedule=sigmoid", "stage2.schedule=sigmoid"],
    # the embedded configs' RelaxFlow (no blur) with the settings the ablations favour
    "no_blur_sigmoid": ["stage1.sigma_query=0.0", "stage1.sigma_key=0.0",
                        "stage1.schedule=sigmoid", "stage2.schedule=sigmoid"],
    "no_blur_priors_1": ["stage1.sigma_query=0.0", "stage1.sigma_key=0.0",
                         "generate_priors.n_images=1"],
}
BRANCHES = {"relaxflow": "splats.ply", "observation_only": "observation_only.ply",
            "prior_only": "prior_only.ply"}
SURFACE_POINTS, TAU, REFERENCES = 4000, 0.05, 3


def read_cases(path: Path) -> List[AmodalCase]:
    return [AmodalCase.from_dict(d) for d in json.loads(Path(path).read_text())]


def write_inputs(case: AmodalCase, folder: Path) -> Dict[str, Path]:
    rgba, visible, _ = observe(case)
    folder.mkdir(parents=True, exist_ok=True)
    paths = {"image": folder / f"{case.case_id}.png", "mask": folder / f"{case.case_id}_mask.png"}
    Image.fromarray(rgba, "RGBA").save(paths["image"])
    Image.fromarray(visible, "L").save(paths["mask"])
    return paths


def run_method(case: AmodalCase, method: str, inputs: Dict[str, Path], out: Path,
               model: str) -> Dict[str, Any]:
    camera = generator_camera(case)
    overrides = [f"model={model}", f"image={inputs['image']}", f"mask={inputs['mask']}",
                 f"prompt={case.prompt}", f"output_dir={out / 'runs' / method}",
                 "video_frames=12", "video_size=96", f"camera.resolution={case.resolution}",
                 *[f"camera.{k}={v}" for k, v in camera.items()], *PAPER, *METHODS[method]]
    start = time.perf_counter()
    metrics = relaxflow.run(load_config(relaxflow.Config, CONFIG, overrides))
    return {**metrics, "wall_s": time.perf_counter() - start}


@functools.lru_cache(maxsize=None)
def category_references(name: str) -> List[torch.Tensor]:
    """Surface samples of :data:`REFERENCES` training instances of a category (drawn once)."""
    return [surface_points(category(name).sample(seed), 2000, torch.Generator().manual_seed(seed))
            for seed in train_seeds(REFERENCES)]


def references(names: List[str]) -> Dict[str, List[torch.Tensor]]:
    return {name: category_references(name) for name in names}


def score(case: AmodalCase, run_dir: Path, branch: str) -> Dict[str, Any]:
    """Every score of one branch's result on one case."""
    obj = case.instance
    splats = to_world(Splats.load_ply(run_dir / BRANCHES[branch]))
    voxels = np.load(run_dir / "branch_voxels.npz")
    resolution = int(voxels["resolution"])
    cells = torch.from_numpy(voxels[branch].astype(np.int64))
    truth = occupancy_grid(obj, resolution)
    pred = torch.zeros_like(truth)
    pred[cells[:, 0], cells[:, 1], cells[:, 2]] = True
    hidden = hidden_region(case, resolution)
    # hidden: everywhere but the cells the observation shows occupied
    result: Dict[str, Any] = {"iou": voxel_iou(pred, truth),
                              "iou_hidden": voxel_iou(pred, truth, ~(truth & ~hidden))}
    generator = torch.Generator().manual_seed(case.seed)
    gt_points = surface_points(obj, SURFACE_POINTS, generator)
    points = splat_surface_points(splats, SURFACE_POINTS, torch.Generator().manual_seed(0))
    result["chamfer"] = chamfer_distance(points, gt_points)
    result["f_score"] = f_score(points, gt_points, TAU)["f_score"]
    gt_hidden = hidden_points(case, gt_points)
    if gt_hidden.any():
        pred_h, gt_h = restrict_to_region(points, gt_points, gt_hidden)
        result["chamfer_hidden"] = chamfer_distance(pred_h, gt_h) if len(pred_h) else float("inf")
        result["f_score_hidden"] = f_score(pred_h, gt_h, TAU)["f_score"] if len(pred_h) else 0.0
    if case.ambiguous_with:
        nearest, _ = nearest_category(points, references([case.category,
                                                          *case.ambiguous_with]))
        result["adherent"] = float(nearest == case.category)
    return {**result, **scene_scores(case, splats)}


def branch_seconds(metrics: Dict[str, Any], branch: str) -> float:
    return sum(v for k, v in metrics.items()
               if k.endswith(f"_{branch}_s") and k.split("_")[0] in ("structure", "latent"))


def run(args) -> None:
    cases = read_cases(args.cases)[args.offset:: args.stride][: args.limit]
    methods = args.methods.split(",") if args.methods else list(METHODS)
    unknown = sorted(set(methods) - set(METHODS))
    if unknown:
        sys.exit(f"unknown methods {unknown}; known: {', '.join(METHODS)}")
    results_path = args.out / "results.jsonl"
    args.out.mkdir(parents=True, exist_ok=True)
    done = set()
    if results_path.is_file():
        done = {(r["case"], r["method"]) for r in map(json.loads, results_path.read_text()
                                                      .splitlines())}
    for case in cases:
        inputs = write_inputs(case, args.out / "inputs")
        for method in methods:
            if (case.case_id, method) in done:
                continue
            metrics = run_method(case, method, inputs, args.out, args.model)
            run_dir = Path(metrics["run_dir"])
            rows = []
            for branch in BRANCHES:
                if method != "relaxflow" and branch != "relaxflow":
                    continue  # the single branches do not depend on the RelaxFlow settings
                name = method if branch == "relaxflow" else branch
                rows.append({"case": case.case_id, "method": method, "result": name,
                             "band": case.band, "category": case.category,
                             "ambiguous": bool(case.ambiguous_with), "run_dir": str(run_dir),
                             "seconds": branch_seconds(metrics, branch),
                             "seconds_structure": metrics[f"structure_{branch}_s"],
                             "seconds_latent": metrics[f"latent_{branch}_s"],
                             "voxels": metrics["voxels"][branch],
                             "wall_s": metrics["wall_s"], **score(case, run_dir, branch)})
            with open(results_path, "a") as f:
                f.writelines(json.dumps(r) + "\n" for r in rows)
            print(f"{case.case_id} {method}: " + ", ".join(
                f"{r['result']} IoU {r['iou']:.3f} hidden {r['iou_hidden']:.3f}" for r in rows),
                flush=True)


def scene_scores(case: AmodalCase, world: Splats) -> Dict[str, float]:
    """Splats in the world's frame: PSNR / mask IoU from 8 views around, and at the observation
    camera inside the visible mask."""
    rgba, visible, _ = observe(case)
    with torch.no_grad():
        seen = render(world, case.camera(), background=0.5)
    mask = torch.from_numpy(visible > 127)
    around = view_scores(world, case.instance, cameras_around())
    return {"psnr_around": float(np.median(around["psnr"])),
            "mask_iou_around": float(np.median(around["mask_iou"])),
            "psnr_visible": psnr(seen.rgb[0], torch.from_numpy(rgba[..., :3] / 255.0).float(),
                                 mask),
            "mask_iou_visible": mask_iou(seen.alpha[0], mask[..., None].float(), mask)}


def refine_case(case: AmodalCase, out: Path, steps: int, model: str,
                overrides: List[str]) -> List[Dict[str, Any]]:
    """The four results of one case, scored (``overrides``: more settings of the refine runs)."""
    inputs = write_inputs(case, out / "inputs")
    camera = generator_camera(case)
    rows = []
    scratch = distill.run(load_config(
        distill.Config, ROOT / "configs" / "cfd-splats-embedded.yaml",
        [f"prompt_processor.prompt={case.prompt}", f"steps={steps}",
         f"output_dir={out / 'runs' / 'scratch'}", "video_frames=12"]))
    rows.append(("cfd_scratch", steps, Path(scratch["run_dir"]) / "splats.ply", scratch))
    for budget in (steps, max(1, steps // 3)):
        result = refine.run(load_config(refine.Config, ROOT / "configs" / "refine-embedded.yaml", [
            f"image={inputs['image']}", f"mask={inputs['mask']}", f"prompt={case.prompt}",
            f"relaxflow.model={model}", f"distill.steps={budget}", "distill.video_frames=12",
            f"relaxflow.camera.resolution={case.resolution}",
            *[f"relaxflow.camera.{k}={v}" for k, v in camera.items()],
            f"output_dir={out / 'runs' / f'refine_{budget}'}", *overrides]))
        if budget == steps:
            rows.append(("relaxflow", 0, Path(result["start"]["run_dir"]) / "splats.ply",
                         result["start"]))
        rows.append((f"refine_{'full' if budget == steps else 'third'}", budget,
                     Path(result["cfd"]["run_dir"]) / "splats.ply", result["cfd"]))
    scored = []
    for name, budget, ply, metrics in rows:
        world = Splats.load_ply(ply)
        if name == "relaxflow":
            world = to_world(world)
        scored.append({"case": case.case_id, "band": case.band, "result": name, "steps": budget,
                       "run_dir": str(ply.parent), "wall_s": metrics.get("wall_s"),
                       **scene_scores(case, world)})
    return scored


def refine_cases(args) -> None:
    cases = read_cases(args.cases)[args.offset:: args.stride][: args.limit]
    path = args.out / "refine.jsonl"
    args.out.mkdir(parents=True, exist_ok=True)
    done = ({json.loads(line)["case"] for line in path.read_text().splitlines()}
            if path.is_file() else set())
    for case in cases:
        if case.case_id in done:
            continue
        rows = refine_case(case, args.out, args.steps, args.model, args.refine_overrides)
        with open(path, "a") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)
        print(case.case_id + ": " + ", ".join(f"{r['result']} {r['psnr_around']:.2f} dB"
                                              for r in rows), flush=True)
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    keys = ("psnr_around", "mask_iou_around", "psnr_visible", "wall_s")
    lines = [f"# refine on {len({r['case'] for r in rows})} cases", "",
             "| result | n | " + " | ".join(keys) + " |", "|---" * (len(keys) + 2) + "|"]
    for name in dict.fromkeys(r["result"] for r in rows):
        mine = [r for r in rows if r["result"] == name]
        lines.append(f"| {name} | {len(mine)} | "
                     + " | ".join(mean_ci([r[k] for r in mine]) for k in keys) + " |")
    (args.out / "refine.md").write_text("\n".join(lines) + "\n")
    refine_plot(rows, args.out / "refine.png")
    print("\n".join(lines))


def refine_plot(rows: List[Dict[str, Any]], path: Path) -> None:
    """Per case, against RelaxFlow's completion (x): what refine and CFD from the prompt end at
    (y), from around and at the observation camera; above the diagonal is better than the start."""
    by_case: Dict[str, Dict[str, Dict[str, Any]]] = {}
    for r in rows:
        by_case.setdefault(r["case"], {})[r["result"]] = r
    complete = [c for c in by_case.values() if "relaxflow" in c]
    figure = Figure(figsize=(9, 4.2))
    axes = figure.subplots(1, 2)
    for ax, key, title in zip(axes, ("psnr_around", "psnr_visible"),
                              ("PSNR from 8 views around", "PSNR at the observation, visible")):
        for result, marker in (("refine_full", "o"), ("refine_third", "^"), ("cfd_scratch", "x")):
            mine = [c for c in complete if result in c]
            ax.scatter([c["relaxflow"][key] for c in mine], [c[result][key] for c in mine],
                       marker=marker, label=result, alpha=0.8)
        low, high = ax.get_xlim()
        ax.plot([low, high], [low, high], color="grey", lw=0.8)
        ax.set_xlabel("RelaxFlow's completion (dB)")
        ax.set_ylabel("result (dB)")
        ax.set_title(title)
    axes[0].legend()
    figure.tight_layout()
    figure.savefig(path, dpi=110)


def mean_ci(values: List[float], signed: bool = False) -> str:
    values = [v for v in values if v is not None and np.isfinite(v)]
    sign = "+" if signed else ""
    if not values:
        return "-"
    if len(values) == 1:
        return f"{values[0]:{sign}.3f}"
    mean, half = confidence_interval(values)
    return f"{mean:{sign}.3f} ± {half:.3f}"


# The paper's claims as paired comparisons: (claim, result A, result B, score, A should be
# higher, only the ambiguous cases)
CLAIMS = [
    ("1. RelaxFlow beats observation-only on hidden geometry", "relaxflow", "observation_only",
     "iou_hidden", True, False),
    ("1. ... and on text adherence in the ambiguous cases", "relaxflow", "observation_only",
     "adherent", True, True),
    ("1. ... with visible fidelity within 1 dB (difference of PSNR)", "relaxflow",
     "observation_only", "psnr_visible", None, False),
    ("2. Blur matters: RelaxFlow beats no blur on hidden geometry", "relaxflow", "no_blur",
     "iou_hidden", True, False),
    ("3. The mask matters: RelaxFlow beats no mask on visible fidelity", "relaxflow", "no_mask",
     "psnr_visible", True, False),
    ("4. Grid vs flat topology (hidden geometry; positive: grid wins)", "relaxflow", "flat",
     "iou_hidden", None, False),
]


def paired(rows: List[Dict[str, Any]], a: str, b: str, key: str,
           ambiguous_only: bool = False) -> List[float]:
    """``key`` of result ``a`` minus that of ``b`` over the cases that have both."""
    by = {(r["case"], r["result"]): r for r in rows}
    diffs = [by[(case, a)][key] - by[(case, b)][key] for case, name in by
             if name == a and (case, b) in by and key in by[(case, a)]
             and key in by[(case, b)] and (by[(case, a)]["ambiguous"] or not ambiguous_only)]
    return [d for d in diffs if np.isfinite(d)]


def claims(rows: List[Dict[str, Any]]) -> List[str]:
    """Each claim's paired difference (A - B over the cases both have) with its 95% interval."""
    lines = ["## The paper's claims on this testbed", ""]
    for text, a, b, key, higher, ambiguous_only in CLAIMS:
        diffs = paired(rows, a, b, key, ambiguous_only)
        if not diffs:
            lines.append(f"- {text}: no cases yet")
            continue
        mean, half = confidence_interval(diffs)
        if higher is None:
            verdict = "(read the sign)"
        elif mean - half > 0:
            verdict = "reproduced"
        elif mean + half < 0:
            verdict = "refuted"
        else:
            verdict = "not decided at 95%"
        lines.append(f"- {text}: {a} - {b} = {mean:+.3f} ± {half:.3f} over {len(diffs)} cases: "
                     f"{verdict}")
    return lines


ABLATION_KEYS = ("iou_hidden", "adherent", "psnr_visible", "psnr_around")


def ablations(rows: List[Dict[str, Any]], base: str, title: str) -> List[str]:
    """Every other result minus ``base``, paired over the cases both ran (means with 95%
    intervals; adherence over the ambiguous cases only)."""
    lines = [f"## Each result minus {title} (paired cases)", "",
             "| result | n | " + " | ".join(ABLATION_KEYS) + " |",
             "|---" * (len(ABLATION_KEYS) + 2) + "|"]
    for name in dict.fromkeys(r["result"] for r in rows):
        n = len(paired(rows, name, base, "iou_hidden"))
        if name == base or not n:
            continue
        cells = [mean_ci(paired(rows, name, base, key, key == "adherent"), signed=True)
                 for key in ABLATION_KEYS]
        lines.append(f"| {name} | {n} | " + " | ".join(cells) + " |")
    return lines


def time_ratios(rows: List[Dict[str, Any]]) -> List[str]:
    """Each result's sampling time against observation-only's on the same cases: in all, in
    stage 1 (the same dense latent for every branch: the dual branch's own cost) and in stage 2
    per voxel (stage 2 runs on each branch's own structure, and a completion has more voxels
    than the visible part alone). Observation-only's times are those of the case's ``relaxflow``
    run (the only method whose single branches are kept; they do not depend on the settings),
    so a method's ratio pairs two runs; a run times its RelaxFlow branch first in each stage."""
    by = {(r["case"], r["result"]): r for r in rows if "seconds_structure" in r}
    lines = ["## Time against observation only (sampling stages, paired cases)", "",
             "| result | n | all | stage 1 | stage 2 per voxel | voxels |", "|---" * 6 + "|"]
    for name in dict.fromkeys(result for _, result in by):
        pairs = [(by[(case, name)], by[(case, "observation_only")]) for case, result in by
                 if result == name and (case, "observation_only") in by]
        if name == "observation_only" or not pairs:
            continue

        def ratio(seconds) -> str:
            return f"{sum(seconds(a) for a, _ in pairs) / sum(seconds(b) for _, b in pairs):.2f}"

        lines.append(f"| {name} | {len(pairs)} | {ratio(lambda r: r['seconds'])} | "
                     f"{ratio(lambda r: r['seconds_structure'])} | "
                     f"{ratio(lambda r: r['seconds_latent'] / r['voxels'])} | "
                     f"{ratio(lambda r: r['voxels'])} |")
    return lines


KEYS = ("iou", "iou_hidden", "chamfer", "chamfer_hidden", "f_score_hidden", "adherent",
        "psnr_visible", "mask_iou_visible", "psnr_around", "mask_iou_around", "seconds")


def report(args) -> None:
    rows = [json.loads(line) for out in (args.out, *args.also)
            for line in (out / "results.jsonl").read_text().splitlines()]
    results = list(dict.fromkeys(r["result"] for r in rows))
    lines = [f"# Amodal benchmark: {len({r['case'] for r in rows})} cases", ""]
    for band in [*sorted({r["band"] for r in rows}), "all"]:
        lines += [f"## Band {band}", "", "| result | n | " + " | ".join(KEYS) + " |",
                  "|---" * (len(KEYS) + 2) + "|"]
        for name in results:
            mine = [r for r in rows if r["result"] == name and band in ("all", r["band"])]
            lines.append(f"| {name} | {len(mine)} | " + " | ".join(
                mean_ci([r[k] for r in mine if k in r]) for k in KEYS) + " |")
        lines.append("")
    lines += [*claims(rows), "", *ablations(rows, "relaxflow", "the paper's RelaxFlow"), "",
              *ablations(rows, "no_blur", "no blur (the embedded configs' RelaxFlow)"), "",
              *time_ratios(rows)]
    (args.out / "report.md").write_text("\n".join(lines) + "\n")
    picture(rows, read_cases(args.cases), args.out)
    print("\n".join(lines))


TILE = 128


def back_view(case: AmodalCase):
    """The camera opposite the observation's (what it hid most), in the world."""
    one = lambda v: torch.tensor([float(v)])  # noqa: E731
    return orbit_cameras(one(case.elevation), one(case.azimuth + 180), one(case.distance),
                         one(case.fov), TILE, TILE)


def picture(rows: List[Dict[str, Any]], cases: List[AmodalCase], out: Path) -> None:
    """``grid.png``: per category, its first case: the observation, then from behind each
    branch's result and the ground truth."""
    by_id = {c.case_id: c for c in cases}
    firsts = {}
    for r in rows:
        firsts.setdefault(r["category"], r)
    columns = [*BRANCHES, "truth"]
    grid = Image.new("RGB", (TILE * (len(columns) + 1), TILE * len(firsts) + 16), "white")
    draw = ImageDraw.Draw(grid)
    for i, name in enumerate(["observation", *columns]):
        draw.text((i * TILE + 4, 2), name, fill="black")
    for row, r in enumerate(firsts.values()):
        case, run_dir, y = by_id[r["case"]], Path(r["run_dir"]), 16 + row * TILE
        observed = Image.open(out / "inputs" / f"{case.case_id}.png").convert("RGB")
        grid.paste(observed.resize((TILE, TILE)), (0, y))
        camera = back_view(case)
        scenes = [to_world(Splats.load_ply(run_dir / BRANCHES[b]))
                  for b in BRANCHES] + [object_splats(case.instance)]
        for col, scene in enumerate(scenes, start=1):
            with torch.no_grad():
                rgb = render(scene, camera, background=0.5).rgb[0].clamp(0, 1)
            grid.paste(Image.fromarray((rgb.numpy() * 255 + 0.5).astype(np.uint8)),
                       (col * TILE, y))
        draw.text((4, y + 4), f"{case.category} {case.band}", fill="black")
    grid.save(out / "grid.png")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    cases = sub.add_parser("cases")
    cases.add_argument("path", type=Path)
    cases.add_argument("--per-category-band", type=int, default=2)
    cases.add_argument("--seed", type=int, default=0)
    cases.add_argument("--known", action="store_true",
                       help="instances the embedded prior knows (one case per band)")
    runs = sub.add_parser("run")
    runs.add_argument("out", type=Path)
    runs.add_argument("--cases", type=Path, default=ROOT / "benchmarks" / "amodal_cases.json")
    runs.add_argument("--methods", default="")
    runs.add_argument("--limit", type=int, default=None)
    runs.add_argument("--stride", type=int, default=1,
                      help="every n-th case (2: one per category and band)")
    runs.add_argument("--offset", type=int, default=0,
                      help="the first case taken (with --stride 2, offsets 0 and 1 split the "
                           "cases between two processes, each with its own OUT; report OUT "
                           "--also OUT2 joins them)")
    runs.add_argument("--model", default="embedded")
    rep = sub.add_parser("report")
    rep.add_argument("out", type=Path)
    rep.add_argument("--also", type=Path, nargs="*", default=[],
                     help="more OUT folders whose results join OUT's (runs split by --offset)")
    rep.add_argument("--cases", type=Path, default=ROOT / "benchmarks" / "amodal_cases.json")
    ref = sub.add_parser("refine")
    ref.add_argument("out", type=Path)
    ref.add_argument("--cases", type=Path, default=ROOT / "benchmarks" / "amodal_cases.json")
    ref.add_argument("--steps", type=int, default=300)
    ref.add_argument("--limit", type=int, default=None)
    ref.add_argument("--stride", type=int, default=1,
                     help="every n-th case (6: one per category)")
    ref.add_argument("--offset", type=int, default=0, help="the first case taken")
    ref.add_argument("--model", default="embedded")
    ref.add_argument("--refine-overrides", nargs="*", default=[],
                     help="more settings of the refine runs, e.g. "
                          "distill.splats.init.max_splats=3000")
    args = parser.parse_args()
    if getattr(args, "offset", 0) < 0 or getattr(args, "stride", 1) < 1:
        parser.error("--offset must be >= 0 and --stride >= 1")
    if args.command == "cases":
        if args.known:
            drawn = make_cases(1, args.seed, categories=variant_categories(),
                               instance_seeds=variant_seeds())
        else:
            drawn = make_cases(args.per_category_band, args.seed)
        args.path.write_text(json.dumps([c.to_dict() for c in drawn], indent=1))
        ambiguous = sum(bool(c.ambiguous_with) for c in drawn)
        print(f"{len(drawn)} cases ({ambiguous} ambiguous) in {args.path}")
    elif args.command == "run":
        run(args)
    elif args.command == "refine":
        refine_cases(args)
    else:
        report(args)


if __name__ == "__main__":
    main()
