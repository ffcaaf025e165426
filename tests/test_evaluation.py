"""The metrics library (cfd.evaluation) on shapes and images with known answers, and the
feature metrics on tiny random CLIP and DINOv2 models built here (no weights downloaded)."""

import json
import math

import imageio.v3 as iio
import numpy as np
import pytest
import scipy.linalg
import torch
import torch.nn.functional as F

from cfd.cameras import viewmats_to_opengl_c2w
from cfd.evaluation import (adherence_accuracy, chamfer_distance, clip_image_embeddings,
                            clip_r_precision, clip_score, clip_text_embeddings,
                            confidence_interval, depth_to_normals, dinov2_cls_features,
                            dinov2_frechet_distance, export_gpteval3d, f_score, frechet_distance,
                            frechet_distance_from_stats, gpteval3d_cameras, grid_cell_centres,
                            grid_surface_points, load_clip, load_dinov2, mask_iou,
                            nearest_category, nearest_neighbours, points_in_grid, psnr,
                            r_precision_hits, restrict_to_region, splat_surface_points,
                            voxel_iou)
from cfd.renderers.occupancy import OccupancyConfig, OccupancyGrid
from cfd.scene import NeRFConfig, NeRFField, Splats
from cfd.scene.hash_grid import HashGridConfig
from cfd.shapes import primitives
from guidance.loading import ModelWeightsNotFound
from tests.tiny_eval_models import IMAGE_SIZE, build_tiny_clip
from tests.tiny_models import build_tiny_dinov2


def sphere_points(n, radius, seed=0):
    return primitives.sphere(n, torch.Generator().manual_seed(seed), radius)[0].float()


def box_points(n, size, seed=0):
    return primitives.box(n, torch.Generator().manual_seed(seed), size)[0].float()


def box_grid(resolution, lo, hi, shift=0):
    """``[R,R,R]`` grid occupied on cells lo..hi-1 per axis, shifted by ``shift`` cells in x."""
    grid = torch.zeros(resolution, resolution, resolution, dtype=torch.bool)
    grid[lo + shift:hi + shift, lo:hi, lo:hi] = True
    return grid


# -- geometry -------------------------------------------------------------------------------------
def test_nearest_neighbours_is_exact_across_chunks():
    g = torch.Generator().manual_seed(0)
    queries, points = torch.rand(700, 3, generator=g), torch.rand(500, 3, generator=g)
    distances, indices = nearest_neighbours(queries, points, chunk_elements=3000)
    exact = torch.cdist(queries.double(), points.double(),
                        compute_mode="donot_use_mm_for_euclid_dist").min(1)
    assert torch.equal(indices, exact.indices)
    assert torch.allclose(distances.double(), exact.values, atol=1e-6)
    assert nearest_neighbours(points, points, chunk_elements=3000)[0].max() == 0


def test_chamfer_of_concentric_spheres_is_their_gap():
    radius, gap = 0.5, 0.05
    inner, outer = sphere_points(8000, radius, seed=1), sphere_points(8000, radius + gap, seed=2)
    assert chamfer_distance(inner, outer) == pytest.approx(gap, abs=0.002)
    # a threshold below the gap finds nothing, one above it everything
    assert f_score(inner, outer, tau=0.8 * gap)["f_score"] == 0.0
    assert f_score(inner, outer, tau=1.3 * gap)["f_score"] == 1.0


def test_cube_against_itself_and_half_of_it():
    cube = box_points(4000, (0.8, 0.8, 0.8))
    assert chamfer_distance(cube, cube) == 0.0
    assert f_score(cube, cube, tau=1e-4) == {"precision": 1.0, "recall": 1.0, "f_score": 1.0}
    top = cube[cube[:, 2] > 0]  # every predicted point is on the truth, half the truth covered
    scores = f_score(top, cube, tau=0.005)
    assert scores["precision"] == 1.0
    assert scores["recall"] == pytest.approx(0.5, abs=0.03)
    assert scores["f_score"] == pytest.approx(2 * 0.5 / 1.5, abs=0.03)
    assert chamfer_distance(torch.zeros(0, 3), cube) == math.inf
    assert f_score(torch.zeros(0, 3), cube, 0.1)["f_score"] == 0.0


def test_voxel_iou_of_shifted_boxes_and_in_a_region():
    pred, target = box_grid(16, 4, 12), box_grid(16, 4, 12, shift=2)
    assert voxel_iou(pred, target) == pytest.approx(6 / 10)
    assert voxel_iou(pred, pred) == 1.0
    region = torch.zeros(16, 16, 16, dtype=torch.bool)
    region[:8] = True  # pred has x slices 4..7 there, target 6..7
    assert voxel_iou(pred, target, region) == pytest.approx(2 / 4)
    empty = torch.zeros_like(pred)
    assert voxel_iou(empty, empty) == 1.0
    with pytest.raises(ValueError, match="bool"):
        voxel_iou(pred.float(), target)


def test_points_in_grid_uses_the_occupancy_grid_cells():
    occupancy = OccupancyGrid(0.8, OccupancyConfig(resolution=8))
    occupancy.occupied = torch.rand(8, 8, 8, generator=torch.Generator().manual_seed(0)) > 0.5
    points = (torch.rand(2000, 3, generator=torch.Generator().manual_seed(1)) - 0.5) * 1.58
    assert torch.equal(points_in_grid(points, occupancy.occupied, 0.8), occupancy.lookup(points))
    outside = torch.tensor([[0.9, 0.0, 0.0], [0.0, -0.81, 0.0]])
    assert not points_in_grid(outside, torch.ones(8, 8, 8, dtype=torch.bool), 0.8).any()


def test_grid_surface_points_are_the_boundary_cells():
    solid = box_grid(16, 4, 12)
    surface = grid_surface_points(solid, radius=1.0)
    assert len(surface) == 8 ** 3 - 6 ** 3
    centres = grid_cell_centres(16, 1.0)
    on_a_face = ((surface - centres[4]).abs() < 1e-6) | ((surface - centres[11]).abs() < 1e-6)
    assert on_a_face.any(-1).all()
    axis = grid_cell_centres(32, 1.0)
    x, y, z = torch.meshgrid(axis, axis, axis, indexing="ij")
    ball = (x ** 2 + y ** 2 + z ** 2).sqrt() <= 0.6
    radii = grid_surface_points(ball, 1.0).norm(dim=-1)
    cell = 2.0 / 32
    assert radii.max() <= 0.6 and radii.min() >= 0.6 - math.sqrt(3) * cell


def test_chamfer_and_f_score_restricted_to_a_region():
    radius, gap = 0.5, 0.04
    gt = sphere_points(8000, radius, seed=3)
    pred = gt.clone()
    pred[pred[:, 0] > 0] *= (radius + gap) / radius  # the +x half is off by the gap
    region = torch.zeros(16, 16, 16, dtype=torch.bool)
    region[8:] = True  # cells with x > 0
    in_region = points_in_grid(gt, region, 1.0)
    assert in_region.float().mean() == pytest.approx(0.5, abs=0.03)
    pred_in, gt_in = restrict_to_region(pred, gt, in_region)
    pred_out, gt_out = restrict_to_region(pred, gt, ~in_region)
    assert chamfer_distance(pred_in, gt_in) == pytest.approx(gap, rel=0.05)
    assert chamfer_distance(pred_out, gt_out) < 0.05 * gap  # exact but along the border
    assert chamfer_distance(pred, gt) == pytest.approx(gap / 2, rel=0.15)
    assert f_score(pred_in, gt_in, tau=gap / 2)["f_score"] < 0.1
    assert f_score(pred_out, gt_out, tau=gap / 2)["f_score"] > 0.9
    with pytest.raises(ValueError, match="no ground-truth point"):
        restrict_to_region(pred, gt, torch.zeros(len(gt), dtype=torch.bool))


def test_splat_surface_points_follow_opacity_and_the_gaussians():
    g = torch.Generator().manual_seed(0)
    means = torch.tensor([[1.0, 0.0, 0.0], [-1.0, 0.0, 0.0]])
    two = Splats.from_activated(means, torch.full((2, 3), 1e-3), torch.tensor([[1.0, 0, 0, 0]] * 2),
                                torch.tensor([0.9, 0.1]), torch.full((2, 3), 0.5))
    centres = splat_surface_points(two, 4000, g, from_gaussians=False)
    assert ((centres == means[0]).all(-1) | (centres == means[1]).all(-1)).all()
    assert (centres[:, 0] > 0).float().mean() == pytest.approx(0.9, abs=0.02)
    # one Gaussian turned 90 degrees about z: its x spread is its y scale and vice versa
    quarter = torch.tensor([[math.cos(math.pi / 4), 0.0, 0.0, math.sin(math.pi / 4)]])
    one = Splats.from_activated(torch.zeros(1, 3), torch.tensor([[0.1, 0.2, 0.3]]), quarter,
                                torch.tensor([0.5]), torch.full((1, 3), 0.5))
    samples = splat_surface_points(one, 20000, g).double()
    expected = torch.diag(torch.tensor([0.2, 0.1, 0.3], dtype=torch.float64) ** 2)
    assert torch.allclose(torch.cov(samples.T), expected, atol=2e-3)


def test_nearest_category_and_adherence_accuracy():
    references = {"ball": [sphere_points(2000, 0.5, 5), sphere_points(2000, 0.3, 6)],
                  "cube": [box_points(2000, (0.8, 0.8, 0.8), 7)]}
    small_ball, cube = sphere_points(2000, 0.32, 8), box_points(2000, (0.8, 0.8, 0.8), 9)
    category, distances = nearest_category(small_ball, references)
    assert category == "ball" and distances["ball"] == pytest.approx(0.02, abs=0.01)
    assert distances["cube"] > 2 * distances["ball"]
    assert nearest_category(cube, references)[0] == "cube"
    assert adherence_accuracy([small_ball, cube], ["ball", "cube"], references) == 1.0
    assert adherence_accuracy([small_ball, cube], ["ball", "ball"], references) == 0.5
    with pytest.raises(ValueError, match="no references"):
        adherence_accuracy([cube], ["mug"], references)


# -- images ---------------------------------------------------------------------------------------
def test_psnr_and_mask_iou_inside_a_mask():
    target = torch.full((2, 8, 8, 3), 0.5)
    mask = torch.zeros(2, 8, 8, 1, dtype=torch.bool)
    mask[:, :4] = True
    pred = torch.where(mask, target + 0.1, target)  # wrong by 0.1 inside the mask only
    assert psnr(pred, target, mask) == pytest.approx(20.0)
    assert psnr(pred, target) == pytest.approx(10 * math.log10(1 / (0.01 / 2)))
    assert psnr(pred, target, ~mask[..., 0]) == pytest.approx(120.0)  # [B,H,W] mask, no error
    with pytest.raises(ValueError, match="no pixel"):
        psnr(pred, target, torch.zeros_like(mask))
    alpha_a, alpha_b = torch.zeros(1, 8, 8, 1), torch.zeros(1, 8, 8, 1)
    alpha_a[:, :, :4], alpha_b[:, :, 2:6] = 1.0, 1.0  # columns 0-3 and 2-5
    assert mask_iou(alpha_a, alpha_b) == pytest.approx(2 / 6)
    left = torch.zeros(1, 8, 8, 1)
    left[:, :, :3] = 1.0  # count columns 0-2 only: a covers 3, b covers 1 (column 2)
    assert mask_iou(alpha_a, alpha_b, left) == pytest.approx(1 / 3)


def test_confidence_interval_from_the_t_distribution():
    mean, half = confidence_interval([1.0, 2.0, 3.0, 4.0, 5.0])
    # t(0.975, 4) = 2.776445; s = sqrt(2.5)
    assert mean == 3.0 and half == pytest.approx(2.776445 * math.sqrt(2.5) / math.sqrt(5), rel=1e-6)
    assert confidence_interval([2.0, 2.0, 2.0]) == (2.0, 0.0)
    assert confidence_interval([7.0]) == (7.0, math.inf)
    with pytest.raises(ValueError):
        confidence_interval([])


# -- Fréchet distance -----------------------------------------------------------------------------
def test_frechet_distance_closed_forms():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(500, 1, generator=g, dtype=torch.float64) * 2.0 + 1.0
    b = torch.randn(300, 1, generator=g, dtype=torch.float64) * 0.5 - 1.0
    # 1-D: (m_a - m_b)^2 + (s_a - s_b)^2 with the sample moments
    closed = (a.mean() - b.mean()) ** 2 + (a.std() - b.std()) ** 2
    assert frechet_distance(a, b) == pytest.approx(float(closed), rel=1e-10)
    features = torch.randn(50, 8, generator=g, dtype=torch.float64)
    assert frechet_distance(features, features) == pytest.approx(0.0, abs=1e-9)


def test_frechet_distance_matches_a_general_matrix_square_root():
    g = torch.Generator().manual_seed(1)
    a = torch.randn(200, 6, generator=g, dtype=torch.float64) @ torch.randn(6, 6, generator=g,
                                                                         dtype=torch.float64)
    b = torch.randn(150, 6, generator=g, dtype=torch.float64) + 0.3
    mu_a, mu_b = a.mean(0).numpy(), b.mean(0).numpy()
    sigma_a, sigma_b = np.cov(a.numpy().T), np.cov(b.numpy().T)
    root = scipy.linalg.sqrtm(sigma_a @ sigma_b).real
    expected = ((mu_a - mu_b) ** 2).sum() + np.trace(sigma_a + sigma_b - 2 * root)
    assert frechet_distance(a, b) == pytest.approx(expected, rel=1e-8)
    # fewer samples than dimensions: singular covariances still give a finite distance
    few = frechet_distance(torch.randn(5, 32, generator=g), torch.randn(6, 32, generator=g))
    assert math.isfinite(few) and few > 0
    assert frechet_distance_from_stats(torch.zeros(2), torch.eye(2), torch.ones(2),
                                       4 * torch.eye(2)) == pytest.approx(2 + 2 * (2 - 1) ** 2)


# -- CLIP and DINOv2 on tiny random models --------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory):
    folder = build_tiny_clip(tmp_path_factory.mktemp("models") / "clip")
    return load_clip(folder)


def _model_cosines(clip, images, texts):
    """Cosines from CLIPModel's own forward (its logits over its logit scale)."""
    pixels = clip.processor(images=[(im.numpy() * 255 + 0.5).astype(np.uint8) for im in images],
                            return_tensors="pt").pixel_values
    assert pixels.shape[-1] == IMAGE_SIZE
    tokens = clip.processor(text=texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        out = clip.model(input_ids=tokens.input_ids, attention_mask=tokens.attention_mask,
                         pixel_values=pixels)
        return out.logits_per_image / clip.model.logit_scale.exp()


def test_clip_score_is_torchmetrics_definition(tiny_clip):
    images = torch.rand(4, 40, 48, 3, generator=torch.Generator().manual_seed(0))
    cosines = _model_cosines(tiny_clip, images, ["a red mug"])[:, 0]
    embedded = clip_image_embeddings(tiny_clip, images) @ clip_text_embeddings(
        tiny_clip, ["a red mug"]).T
    assert torch.allclose(embedded[:, 0], cosines, atol=1e-5)
    assert clip_score(tiny_clip, images, "a red mug") == pytest.approx(
        max(100 * float(cosines.mean()), 0.0), abs=1e-3)
    # clamped at 0 and a cosine's 100 times at most
    assert 0.0 <= clip_score(tiny_clip, images, "a chair") <= 100.0


def test_r_precision_hits_rank_the_own_prompt():
    texts = F.normalize(torch.eye(3), dim=-1)
    images = F.normalize(torch.tensor([[1.0, 0.5, 0.0], [1.0, 0.9, 0.0], [0.0, 0.2, 1.0]]), dim=-1)
    targets = torch.tensor([0, 1, 1])
    assert r_precision_hits(images, texts, targets, k=1).tolist() == [True, False, False]
    assert r_precision_hits(images, texts, targets, k=2).tolist() == [True, True, True]
    with pytest.raises(ValueError, match="k must be"):
        r_precision_hits(images, texts, targets, k=4)


def test_clip_r_precision_agrees_with_the_model(tiny_clip):
    g = torch.Generator().manual_seed(1)
    renders = [torch.rand(3, 32, 32, 3, generator=g), torch.rand(2, 32, 32, 3, generator=g)]
    prompts, distractors = ["a mug", "a chair"], ["a house", "a mug"]
    candidates = ["a mug", "a chair", "a house"]
    expected = []
    for views, own in zip(renders, [0, 1]):
        cosines = _model_cosines(tiny_clip, views, candidates)
        expected += ((cosines >= cosines[:, own:own + 1]).sum(1) - 1 < 2).tolist()
    assert clip_r_precision(tiny_clip, renders, prompts, distractors, k=2) == pytest.approx(
        sum(expected) / len(expected))
    assert clip_r_precision(tiny_clip, renders, prompts, distractors, k=3) == 1.0


def test_missing_or_broken_models_are_named_before_any_work(tmp_path):
    with pytest.raises(ModelWeightsNotFound, match="studies.clip_model=<folder>"):
        load_clip(tmp_path / "no-such-model", option="studies.clip_model")
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text(json.dumps({"model_type": "dinov2"}))
    with pytest.raises(ModelWeightsNotFound, match="evaluation.dinov2_model"):
        load_dinov2(broken)


def test_dinov2_features_and_their_frechet_distance(tmp_path):
    model = load_dinov2(build_tiny_dinov2(tmp_path / "dinov2"))
    g = torch.Generator().manual_seed(2)
    images = torch.rand(6, 30, 30, 3, generator=g)
    features = dinov2_cls_features(model, images, image_size=28, batch_size=4)
    assert features.shape == (6, model.config.hidden_size) and features.dtype == torch.float64
    with torch.no_grad():  # the CLS token after the final norm, from the model's own output
        single = model(pixel_values=((F.interpolate(
            images[:1].permute(0, 3, 1, 2), size=(28, 28), mode="bicubic", antialias=True)
            .clamp(0, 1) - torch.tensor([0.485, 0.456, 0.406])[:, None, None])
            / torch.tensor([0.229, 0.224, 0.225])[:, None, None])).last_hidden_state[0, 0]
    assert torch.allclose(features[0].float(), single, atol=1e-5)
    assert dinov2_frechet_distance(model, images, images, image_size=28) == pytest.approx(
        0.0, abs=1e-9)
    darker = dinov2_frechet_distance(model, images, images * 0.2, image_size=28)
    assert darker > 0
    with pytest.raises(ValueError, match="multiple"):
        dinov2_cls_features(model, images, image_size=30)


# -- GPTEval3D export -----------------------------------------------------------------------------
def test_gpteval3d_cameras_are_threestudios():
    cameras = gpteval3d_cameras(n_views=120, resolution=64)
    azimuth = torch.deg2rad(torch.linspace(0, 360, 120)).double()
    elevation = math.radians(15.0)
    # threestudio's construction: look at the origin, up +z, c2w columns (right, up, -lookat)
    position = 1.5 * torch.stack([math.cos(elevation) * azimuth.cos(),
                                  math.cos(elevation) * azimuth.sin(),
                                  torch.full_like(azimuth, math.sin(elevation))], -1)
    lookat = F.normalize(-position, dim=-1)
    up = torch.tensor([0.0, 0.0, 1.0], dtype=torch.float64).expand_as(lookat)
    right = F.normalize(torch.cross(lookat, up, dim=-1), dim=-1)
    up = F.normalize(torch.cross(right, lookat, dim=-1), dim=-1)
    c2w = torch.stack([right, up, -lookat, position], -1)
    assert torch.allclose(viewmats_to_opengl_c2w(cameras.viewmats.double())[:, :3], c2w,
                          atol=1e-5)
    assert cameras.Ks[0, 1, 1] == pytest.approx(32 / math.tan(math.radians(35)))


def test_depth_normals_of_planes_and_across_a_depth_step():
    cameras = gpteval3d_cameras(n_views=3, resolution=24).to("cpu")
    directions = cameras.ray_directions().double()
    centres = cameras.centers.double()
    normal = F.normalize(torch.tensor([1.0, 0.3, 0.5], dtype=torch.float64), dim=0)
    # the plane n.x = 0 seen from each camera (facing it: n . centre > 0 for views 0 and 1)
    depth = -(centres @ normal)[:, None, None] / (directions @ normal)
    alpha = torch.ones_like(depth)[..., None]
    normals = depth_to_normals(depth[..., None], alpha, cameras)
    facing = torch.where((centres @ normal > 0)[:, None, None, None], normal, -normal)
    assert torch.allclose(normals, facing.expand_as(normals), atol=1e-6)
    # a nearer plane over the left half: both halves keep their own normal up to the step
    near = -(centres @ normal - 0.3)[:, None, None] / (directions @ normal)
    stepped = torch.cat([near[:, :, :12], depth[:, :, 12:]], 2)[..., None]
    normals = depth_to_normals(stepped, alpha, cameras)
    assert torch.allclose(normals, facing.expand_as(normals), atol=1e-6)
    alpha[:, :, :5] = 0.0  # empty pixels have no normal
    assert depth_to_normals(depth[..., None], alpha, cameras)[:, :, :5].abs().max() == 0


def _wall_splats():
    """A square of flat splats in the plane x = 0, facing +x (where view 0's camera is)."""
    side = torch.linspace(-0.3, 0.3, 25)
    y, z = torch.meshgrid(side, side, indexing="ij")
    means = torch.stack([torch.zeros_like(y), y, z], -1).reshape(-1, 3)
    n = len(means)
    return Splats.from_activated(means, torch.tensor([[0.002, 0.03, 0.03]]).expand(n, 3),
                                 torch.tensor([[1.0, 0.0, 0.0, 0.0]]).expand(n, 4),
                                 torch.full((n,), 0.9), torch.full((n, 3), 0.3))


def _read_png(path):
    return torch.from_numpy(iio.imread(path).astype(np.float32) / 255.0)


def test_export_gpteval3d_layout_of_a_splat_scene(tmp_path):
    method = tmp_path / "cfd3d"
    folder = export_gpteval3d(_wall_splats(), method, prompt_id=7, seed=0, n_views=4,
                              resolution=24, batch_size=3)
    assert folder == method / "7" / "0"
    assert [p.name for p in method.iterdir()] == ["7"]  # GPTEval3D reads every entry as an id
    names = sorted(p.name for p in folder.iterdir())
    assert names == sorted(["cameras.json"] + [f"{kind}_{i}.png" for kind in ("rgb", "normal")
                                               for i in range(4)])
    rgb, normal = _read_png(folder / "rgb_0.png"), _read_png(folder / "normal_0.png")
    assert rgb.shape == normal.shape == (24, 24, 3)
    assert torch.allclose(normal[12, 12], torch.tensor([1.0, 0.5, 0.5]), atol=0.05)  # +x
    assert normal[0, 0].max() == 0 and rgb[0, 0].min() == 1.0  # empty: black normal, white rgb
    poses = json.loads((folder / "cameras.json").read_text())
    assert poses["width"] == 24 and len(poses["views"]) == 4
    assert poses["views"][1]["azimuth_deg"] == pytest.approx(120.0)
    assert poses["views"][0]["fovy_deg"] == pytest.approx(70.0)
    assert poses["views"][0]["c2w"][2][3] == pytest.approx(1.5 * math.sin(math.radians(15)))
    with pytest.raises(ValueError, match="integers"):
        export_gpteval3d(_wall_splats(), method, prompt_id=-1, n_views=2, resolution=8)


def test_export_gpteval3d_nerf_normals(tmp_path):
    grid = HashGridConfig(n_levels=2, log2_hashmap_size=8, max_resolution=8)
    field = NeRFField(NeRFConfig(grid=grid), generator=torch.Generator().manual_seed(0))
    folder = export_gpteval3d(field, tmp_path, prompt_id=0, n_views=2, resolution=16,
                              render_options={"n_samples": 32})
    normal = _read_png(folder / "normal_0.png")
    # the starting blob is a ball: its normal at the image centre points at the camera
    towards_camera = torch.tensor([math.cos(math.radians(15)), 0.0, math.sin(math.radians(15))])
    decoded = F.normalize(normal[8, 8] * 2 - 1, dim=0)
    assert decoded @ towards_camera > 0.9
    assert normal[0, 0].max() == 0
