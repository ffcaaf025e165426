"""The shape world, its cached dataset and the closed-form embedded prior."""

import json
import math
import os
import stat
import subprocess
import sys
import threading
import time
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from cfd.cameras import Cameras, fixed_orbit_cameras, intrinsics_from_fov, look_at, orbit_cameras
from cfd.renderers import render
from cfd.shapes import (SHAPE_WORLD, ShapeDatasetConfig, build_shape_dataset, dataset_dir,
                        object_splats, prior_objects, prompts)
from cfd.shapes import dataset as shape_dataset
from core.errors import UserError
from guidance.embedded import ClosedFormPrior
from guidance.prompts import PromptConfig, PromptProcessor, view_directions
from guidance.sampling import sample_latents

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    cfg = ShapeDatasetConfig(views_per_object=24, views_per_variant=3, resolution=32,
                             cache_dir=str(tmp_path_factory.mktemp("cache")))
    return cfg, build_shape_dataset(cfg)


@pytest.fixture(scope="module")
def prior(dataset):
    return ClosedFormPrior.from_pretrained(dataset[1])


def test_shape_world_has_variants_and_renders_deterministically():
    assert len(SHAPE_WORLD) >= 12 and len(prompts()) >= 6
    variants = [sum(o.prompt == p for o in SHAPE_WORLD) for p in prompts()]
    assert sum(v >= 2 for v in variants) >= 3 and max(v for v in variants) >= 3
    cams = fixed_orbit_cameras(2, 24, 24, distance=2.5)
    a = render(object_splats(SHAPE_WORLD[0]), cams, background=1.0)
    b = render(object_splats(SHAPE_WORLD[0]), cams, background=1.0)
    assert torch.equal(a.rgb, b.rgb) and a.alpha.max() > 0.99


def test_objects_have_a_front_and_an_up():
    from cfd.cameras import orbit_cameras

    def cams(elevation, azimuth):
        n = len(elevation)
        return orbit_cameras(torch.tensor(elevation), torch.tensor(azimuth),
                             torch.full((n,), 2.5), torch.full((n,), 40.0), 32, 32)

    for obj in SHAPE_WORLD:
        splats = object_splats(obj)
        front, back = render(splats, cams([0.0, 0.0], [0.0, 180.0]), background=1.0).rgb
        assert (front - back.flip(1)).abs().mean() > 0.005, obj.name  # not mirror-symmetric
        above, below = render(splats, cams([40.0, -40.0], [0.0, 0.0]), background=1.0).rgb
        assert (above - below.flip(0)).abs().mean() > 0.005, obj.name  # top differs from bottom


def test_dataset_is_cached_and_keyed_by_settings(dataset, tmp_path):
    cfg, folder = dataset
    assert build_shape_dataset(cfg) == folder  # second call: the cache
    assert not [p for p in folder.parent.iterdir() if ".tmp" in p.name]
    other = ShapeDatasetConfig(**{**cfg.__dict__, "views_per_object": 2,
                                  "cache_dir": cfg.cache_dir})
    other_folder = build_shape_dataset(other)
    assert other_folder != folder and (other_folder / "meta.json").is_file()


def test_dataset_key_follows_the_image_sources(tmp_path, monkeypatch):
    """Editing any file that draws the images (a sampler, the renderer) moves the cache."""
    names = {f"{p.parent.name}/{p.name}" for p in shape_dataset.image_source_files()}
    assert {"shapes/world.py", "shapes/primitives.py", "renderers/rasterize.py",
            "cfd/cameras.py"} <= names
    source = tmp_path / "renderer.py"
    source.write_bytes(b"SCALE = 1.0\n")
    real = shape_dataset.image_source_files()
    monkeypatch.setattr(shape_dataset, "image_source_files", lambda: [*real, source])
    cfg = ShapeDatasetConfig(cache_dir=str(tmp_path / "cache"))
    before = dataset_dir(cfg)
    assert dataset_dir(cfg) == before
    assert dataset_dir(ShapeDatasetConfig(cache_dir=str(tmp_path / "other"))).name == before.name
    source.write_bytes(b"SCALE = 1.5\n")
    assert dataset_dir(cfg) != before


def test_small_t_returns_the_nearest_image_and_large_t_the_mean(prior):
    k = 30
    image = prior.data[k].float().reshape(1, 3, 32, 32)
    text = prior.prompts[int(prior.prompt_index[k])]
    cond = prior.encode_text([text])
    t = torch.tensor([0.01], dtype=torch.float64)
    a, s = prior.schedule.alpha(t).item(), prior.schedule.sigma(t).item()
    x_t = a * image + s * 0.1 * torch.randn(image.shape, generator=torch.Generator().manual_seed(0))
    assert torch.allclose(prior.model_output(x_t, t, cond), image, atol=1e-6)
    uncond = prior.encode_text([""])
    assert torch.allclose(prior.model_output(x_t, t, uncond), image, atol=1e-6)
    # At t = 1 every image weighs the same: the mean of the condition's images.
    x1 = torch.randn(image.shape, generator=torch.Generator().manual_seed(1))
    mean_all = prior.data.mean(0).float().reshape(1, 3, 32, 32)
    one = torch.ones(1, dtype=torch.float64)
    assert torch.allclose(prior.model_output(x1, one, uncond), mean_all, atol=1e-6)
    members = prior.prompt_index == prior.prompt_index[k]
    mean_p = prior.data[members].mean(0).float().reshape(1, 3, 32, 32)
    assert torch.allclose(prior.model_output(x1, one, cond), mean_p, atol=1e-6)
    near_one = prior.model_output(x1, torch.tensor([0.999], dtype=torch.float64), cond)
    assert (near_one - mean_p).abs().max() < 0.1


def test_stable_near_t_zero(prior):
    x = torch.randn(2, 3, 32, 32)
    out = prior.model_output(x, torch.full((2,), 1e-4, dtype=torch.float64),
                             prior.encode_text(["a mug", ""]))
    assert torch.isfinite(out).all() and out.abs().max() <= 1.0 + 1e-6


def test_cfg_scale_zero_is_unconditional_and_deterministic(prior):
    x = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    cond = prior.encode_text(["a mug", "a rocket, side view", "a lamp, back view"])
    uncond = prior.encode_text(["", "", ""])
    t = torch.tensor([0.3, 0.5, 0.7], dtype=torch.float64)
    eps0 = prior.predict_eps(x, t, cond, uncond, guidance_scale=0.0)
    a, s = prior.schedule.alpha(t).float()[:, None, None, None], prior.schedule.sigma(t).float()[
        :, None, None, None]
    expected = (x - a * prior.model_output(x, t, uncond)) / s
    assert torch.allclose(eps0, expected, atol=1e-5)
    eps2 = prior.predict_eps(x, t, cond, uncond, guidance_scale=2.0)
    assert torch.equal(eps2, prior.predict_eps(x, t, cond, uncond, guidance_scale=2.0))
    eps1 = prior.predict_eps(x, t, cond, uncond, guidance_scale=1.0)
    assert torch.allclose(eps2, eps0 + 2.0 * (eps1 - eps0), atol=1e-4)


def test_view_suffix_restricts_to_views_in_that_direction(prior):
    front = prior.encode_text(["a mug, front view"])
    mask = prior.subset_mask(int(front["prompt"][0]), int(front["direction"][0]))
    assert mask.sum() > 0
    assert (prior.direction[mask] == 0).all()
    assert (prior.prompt_index[mask] == prior.prompts.index("a mug")).all()


def test_run_view_thresholds_label_the_prior_images(dataset):
    """The prior must split its images where the run's prompt processor splits its cameras."""
    from cfd.systems.prior import GuidanceConfig, build_guidance

    cfg = GuidanceConfig(dataset=dataset[0])
    default = build_guidance(cfg, "cpu", PromptConfig())
    low = build_guidance(cfg, "cpu", PromptConfig(overhead_threshold=30.0))
    assert not (default.direction == 3).any()  # the shape world's cameras stop at 45 degrees
    overhead = low.direction == 3
    assert overhead.any() and not overhead.all()
    mug = low.encode_text(["a mug, overhead view"])
    mask = low.subset_mask(int(mug["prompt"][0]), int(mug["direction"][0]))
    assert mask.any() and (low.direction[mask] == 3).all()


def test_split_sides_tell_left_from_right(dataset, tmp_path):
    """With ``split_sides`` a camera on +y (azimuth 90: the object's left, as it faces +x) and
    one on -y get different texts, and the prior draws each from its own side's images only."""
    from cfd.systems.prior import GuidanceConfig, build_guidance

    views = PromptConfig(prompt="a mug", split_sides=True, cache_dir=str(tmp_path))
    azimuth = torch.tensor([0.0, 30.0, -30.0, 90.0, 120.0, -90.0, -120.0, 180.0, -170.0])
    directions = view_directions(torch.zeros(9), azimuth, views).tolist()
    assert directions == [0, 0, 0, 1, 1, 4, 4, 2, 2]
    unsplit = view_directions(torch.zeros(9), azimuth, PromptConfig()).tolist()
    assert unsplit == [0, 0, 0, 1, 1, 1, 1, 2, 2]

    prior = build_guidance(GuidanceConfig(dataset=dataset[0]), "cpu", views)
    processor = PromptProcessor(views, prior)
    assert processor.texts[1] == "a mug, left side view"
    assert processor.texts[4] == "a mug, right side view"
    cond, _ = processor(torch.zeros(2), torch.tensor([90.0, -90.0]))
    azimuth = load_file(str(Path(dataset[1]) / "images.safetensors"))["azimuth"]
    image_azimuth = torch.remainder(azimuth + 180, 360) - 180
    for item, side in ((0, 1.0), (1, -1.0)):
        mask = prior.subset_mask(int(cond["prompt"][item]), int(cond["direction"][item]))
        assert mask.sum() > 0
        assert (image_azimuth[mask] * side > 0).all()


def test_unknown_prompt_lists_the_known_ones(prior):
    with pytest.raises(ValueError, match=r"unknown prompt 'a dragon'[\s\S]*a mug[\s\S]*a lamp"
                                         r"[\s\S]*a stool[\s\S]*a lighthouse"):
        prior.encode_text(["a dragon"])


def _dataset_tensors(folder):
    return load_file(str(Path(folder) / "images.safetensors"))


def test_dataset_holds_every_variant_with_its_labels(dataset):
    """The named objects' views, then each category variant's, labelled with their object and
    prompt; a variant's images are its renders from the cameras recorded with them."""
    cfg, folder = dataset
    meta = json.loads((folder / "meta.json").read_text())
    t = _dataset_tensors(folder)
    objects = prior_objects()
    assert meta["prompts"] == prompts() and meta["objects"] == [o.name for o in objects]
    assert meta["object_prompts"] == [o.prompt for o in objects]
    views = [cfg.views_per_object] * len(SHAPE_WORLD) + [cfg.views_per_variant] * (
        len(objects) - len(SHAPE_WORLD))
    assert t["object_index"].tolist() == [k for k, n in enumerate(views) for _ in range(n)]
    assert t["prompt_index"].tolist() == [prompts().index(o.prompt)
                                          for o, n in zip(objects, views) for _ in range(n)]
    assert set(t["prompt_index"].tolist()) == set(range(len(prompts())))  # each prompt has images

    def rerendered(k):
        rows = t["object_index"] == k
        cams = orbit_cameras(t["elevation"][rows], t["azimuth"][rows], t["distance"][rows],
                             t["fov"][rows], cfg.resolution, cfg.resolution)
        return render(object_splats(objects[k]), cams, background=cfg.background).rgb

    stored = t["rgb"][t["object_index"] == len(objects) - 1].float() / 255
    assert (rerendered(len(objects) - 1) - stored).abs().mean() < 2 / 255
    assert (rerendered(len(objects) - 2) - stored).abs().mean() > 10 / 255  # another variant


def test_variants_leave_the_named_objects_images_unchanged(dataset, tmp_path, monkeypatch):
    """The variants come after the named objects and draw their cameras after theirs: the named
    objects' rows are those of a dataset of the named objects alone."""
    cfg, folder = dataset
    full = _dataset_tensors(folder)
    monkeypatch.setattr(shape_dataset, "prior_objects", lambda: SHAPE_WORLD)
    named = _dataset_tensors(build_shape_dataset(replace(cfg, cache_dir=str(tmp_path))))
    n = len(SHAPE_WORLD) * cfg.views_per_object
    assert named["rgb"].shape[0] == n < full["rgb"].shape[0]
    for key in ("rgb", "alpha", "prompt_index", "object_index", "elevation", "azimuth",
                "distance", "fov"):
        assert torch.equal(full[key][:n], named[key]), key


def test_a_category_prompt_conditions_the_prior(prior):
    """A category's prompt (and its view suffixes) ranges over that category's variants."""
    barn = prompts().index("a barn")
    front = prior.encode_text(["a barn, front view"])
    mask = prior.subset_mask(int(front["prompt"][0]), int(front["direction"][0]))
    assert mask.any() and (prior.prompt_index[mask] == barn).all()
    k = int(mask.nonzero()[0, 0])
    image = prior.data[k].float().reshape(1, 3, 32, 32)
    t = torch.tensor([0.01], dtype=torch.float64)
    a = prior.schedule.alpha(t).item()
    assert torch.allclose(prior.model_output(a * image, t, front), image, atol=1e-6)


def test_a_condition_streams_only_its_own_images():
    """Each item's estimate is that of a prior over its condition's images alone, however the
    chunks fall and whatever else the batch asks for."""
    g = torch.Generator().manual_seed(4)
    n, r = 13, 4
    images, opacity = torch.rand(n, r, r, 3, generator=g), torch.rand(n, r, r, 1, generator=g)
    prompt_index, azimuth = torch.arange(n) % 3, torch.linspace(-180, 150, n)
    prior = ClosedFormPrior(images, prompt_index, torch.zeros(n), azimuth, ["a", "b", "c"],
                            opacity=opacity, chunk_size=2)
    texts = ["b", "", "a, back view", "b"]
    x_t = torch.randn(4, 3, r, r, generator=g)
    t = torch.tensor([0.2, 0.5, 0.7, 0.9])
    background = torch.rand(4, 3, generator=g)
    cond = prior.encode_text(texts)
    got = prior.model_output(x_t, t, {**cond, "background": background})
    for i in range(len(texts)):
        mask = prior.subset_mask(int(cond["prompt"][i]), int(cond["direction"][i]))
        assert 0 < mask.sum() < n or texts[i] == ""
        alone = ClosedFormPrior(images[mask], torch.zeros(int(mask.sum())), torch.zeros(
            int(mask.sum())), azimuth[mask], ["x"], opacity=opacity[mask])
        want = alone.model_output(x_t[i:i + 1], t[i:i + 1], {
            **alone.encode_text([""]), "background": background[i:i + 1]})
        assert torch.allclose(got[i:i + 1], want, atol=1e-6), texts[i]


def test_negligible_images_are_left_out_of_the_sum_without_changing_it(monkeypatch):
    """The posterior mean equals the plain softmax over every image of the condition (float64,
    on the item's background) at every t, while the weighted sum reads only the images whose
    weight is not negligible: few at small t, all at t = 1."""
    g = torch.Generator().manual_seed(7)
    n, r = 300, 6
    colour, opacity = torch.rand(n, r, r, 3, generator=g), torch.rand(n, r, r, 1, generator=g)
    on = lambda bg: colour * opacity + bg * (1 - opacity)  # noqa: E731
    prior = ClosedFormPrior(on(torch.tensor(0.5)), torch.arange(n) % 2, torch.zeros(n),
                            torch.linspace(-180, 179, n), ["a", "b"], opacity=opacity,
                            chunk_size=64)
    read = []
    rows = ClosedFormPrior._rows

    def counted(images, chunk):
        picked = rows(images, chunk)
        read.append(len(range(n)[picked]) if isinstance(picked, slice) else picked.numel())
        return picked
    monkeypatch.setattr(ClosedFormPrior, "_rows", staticmethod(counted))

    background = torch.tensor([[0.5, 0.5, 0.5], [0.9, 0.2, 0.4]], dtype=torch.float64)
    cond = {**prior.encode_text(["", "b"]), "background": background}
    chw = lambda im: im.permute(0, 3, 1, 2).reshape(n, -1).double()  # noqa: E731
    base = chw(on(torch.tensor(0.5))) * 2 - 1
    transparency = chw((1 - opacity).expand(-1, -1, -1, 3))
    images = [base + 2 * transparency * (bg.repeat_interleave(r * r) - 0.5) for bg in background]
    for t in (0.02, 0.1, 0.3, 0.6, 0.9, 1.0):
        a, s = prior.schedule.alpha(torch.tensor(t)), prior.schedule.sigma(torch.tensor(t))
        x0 = torch.stack([images[0][5], images[1][8]]) + 0.05 * torch.randn(
            2, 3 * r * r, generator=g, dtype=torch.float64)
        x_t = a * x0 + s * torch.randn(x0.shape, generator=g, dtype=torch.float64)
        read.clear()
        got = prior.model_output(x_t.reshape(2, 3, r, r), torch.full((2,), t), cond)
        for i, members in enumerate((torch.ones(n, dtype=torch.bool), torch.arange(n) % 2 == 1)):
            X = images[i][members]
            weights = torch.softmax(-((x_t[i] - a * X) ** 2).sum(-1) / (2 * s * s), 0)
            assert torch.allclose(got[i].flatten(), weights @ X, rtol=0, atol=1e-12), (t, i)
        streamed = n + n // 2  # pass 1 over both conditions' images
        summed = sum(read) - streamed
        if t <= 0.1:
            assert summed < streamed / 10, (t, summed)
        if t == 1.0:
            assert summed == streamed


class _Views:
    def __init__(self, elevation, azimuth):
        self.elevation, self.azimuth = elevation, azimuth


def test_surrogate_gradient_is_weighted_eps_difference(prior, tmp_path):
    proc = PromptProcessor(PromptConfig(prompt="a mug", cache_dir=str(tmp_path)), prior)
    prior.guidance_scale = 1.5
    g = torch.Generator().manual_seed(3)
    rgb = torch.rand(2, 32, 32, 3, generator=g).requires_grad_()
    noise = torch.randn(2, 3, 32, 32, generator=g)
    views = _Views(torch.tensor([10.0, 20.0]), torch.tensor([0.0, 120.0]))
    t = torch.tensor([0.4, 0.6], dtype=torch.float64)
    out = prior(rgb, views, proc, t, noise)
    out["loss_sds"].backward()
    latents = prior.encode(rgb.detach())
    cond, uncond = proc(views.elevation, views.azimuth)
    x_t = prior.schedule.add_noise(latents, noise, t)
    eps = prior.predict_eps(x_t, t, cond, uncond, 1.5)
    w = (prior.schedule.sigma(t) / prior.schedule.alpha(t)).float()[:, None, None, None]
    expected_latent_grad = w * (eps - noise)
    # encode is rgb -> 2 rgb - 1 (channels first), so d/d rgb = 2 * d/d latents.
    assert torch.allclose(rgb.grad, 2 * expected_latent_grad.permute(0, 2, 3, 1), atol=1e-6)
    assert set(out) >= {"loss_sds", "grad_norm", "t", "guidance_scale"}


def test_prompts_command_lists_the_prompts():
    proc = subprocess.run([sys.executable, str(ROOT / "run.py"), "prompts"], capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0
    assert proc.stdout.split("\n")[:-1] == prompts()
    assert math.isfinite(len(prompts()))


def test_data_layout_matches_encode():
    images = torch.rand(5, 8, 8, 3, generator=torch.Generator().manual_seed(0))
    p = ClosedFormPrior(images, torch.zeros(5), torch.zeros(5), torch.zeros(5), ["a thing"])
    assert torch.allclose(p.encode(images).reshape(5, -1).double(), p.data)
    # Renders at another size are area-resized to the data's resolution.
    assert p.encode(torch.rand(2, 16, 16, 3)).shape == (2, 3, 8, 8)
    assert p.latent_shape(128, 128) == (3, 8, 8)


def test_background_recomposites_the_images_exactly():
    """A condition's background gives the same denoiser as a prior whose images were composited
    on that colour in the first place; without the opacity it is a clear error."""
    g = torch.Generator().manual_seed(0)
    n, r = 12, 8
    colour, opacity = torch.rand(n, r, r, 3, generator=g), torch.rand(n, r, r, 1, generator=g)
    labels = dict(prompt_index=torch.arange(n) % 2, elevation=torch.zeros(n),
                  azimuth=torch.linspace(-180, 150, n), prompts=["a", "b"])
    on = lambda bg: colour * opacity + bg * (1 - opacity)  # noqa: E731
    prior = ClosedFormPrior(on(torch.tensor(0.5)), opacity=opacity, data_background=0.5,
                            chunk_size=5, **labels)
    background = torch.tensor([[0.9, 0.1, 0.3], [0.5, 0.5, 0.5], [0.0, 1.0, 0.2]])
    x_t = torch.randn(3, 3, r, r, generator=g)
    t = torch.tensor([0.3, 0.6, 0.9])
    cond = prior.encode_text(["a", "b", ""])
    got = prior.model_output(x_t, t, {**cond, "background": background})
    for i, bg in enumerate(background):
        reference = ClosedFormPrior(on(bg), **labels)
        want = reference.model_output(x_t[i:i + 1], t[i:i + 1], {k: v[i:i + 1] for k, v in cond.items()})
        assert torch.allclose(got[i:i + 1], want, atol=1e-5)
    assert not torch.allclose(got[0], prior.model_output(x_t, t, cond)[0], atol=1e-3)
    with pytest.raises(ValueError, match="opacity="):
        ClosedFormPrior(on(torch.tensor(0.5)), **labels).model_output(
            x_t, t, {**cond, "background": background})


def _tiny_prior(n=6, r=4):
    g = torch.Generator().manual_seed(0)
    return ClosedFormPrior(torch.rand(n, r, r, 3, generator=g), torch.arange(n) % 2,
                           torch.zeros(n), torch.linspace(-180, 150, n), ["a", "b"])


def _constant_prompt(prior, text="a"):
    cond, uncond = prior.encode_text([text]), prior.encode_text([""])
    return lambda elevation, azimuth: tuple({k: v.expand(len(elevation)) for k, v in c.items()}
                                            for c in (cond, uncond))


def test_distillation_rejects_t_at_the_ends_and_sampling_keeps_them():
    """t = 0 (no noise: the prior divides by sigma = 0) and t = 1 (no signal: sigma/alpha is
    infinite) are errors for the loss; ``predict_eps``, which samplers call, takes t = 1."""
    prior = _tiny_prior()
    prompt = _constant_prompt(prior)
    views = _Views(torch.zeros(2), torch.zeros(2))
    rgb = torch.rand(2, 4, 4, 3, requires_grad=True)
    noise = torch.randn(2, 3, 4, 4)
    for t in (0.0, 1.0, torch.tensor([0.5, 1.0]), torch.tensor([0.0, 0.5])):
        with pytest.raises(ValueError, match=r"strictly between 0 and 1"):
            prior(rgb, views, prompt, t, noise)
    assert torch.isfinite(prior(rgb, views, prompt, 0.999, noise)["loss_sds"])
    cond, uncond = prompt(views.elevation, views.azimuth)
    assert torch.isfinite(prior.predict_eps(noise, 1.0, cond, uncond)).all()


def test_non_finite_model_output_reaches_the_caller(monkeypatch):
    """A NaN from the model is not turned into a zero gradient: the caller sees it (and the
    distillation loop skips the step)."""
    prior = _tiny_prior()
    output = prior.model_output

    def broken(x_t, t, cond):
        out = output(x_t, t, cond).clone()
        out[0, 0, 0, 0] = float("nan")
        return out

    monkeypatch.setattr(prior, "model_output", broken)
    rgb = torch.rand(1, 4, 4, 3, requires_grad=True)
    out = prior(rgb, _Views(torch.zeros(1), torch.zeros(1)), _constant_prompt(prior), 0.5,
                torch.randn(1, 3, 4, 4))
    out["loss_sds"].backward()
    assert not torch.isfinite(out["grad_norm"])
    assert not torch.isfinite(rgb.grad).all()


def test_ddim_sampler_lands_on_the_only_image():
    """With one image the exact denoiser always predicts it, so the deterministic sampler,
    whatever the noise, ends on that image."""
    image = torch.rand(1, 4, 4, 3, generator=torch.Generator().manual_seed(2))
    prior = ClosedFormPrior(image, torch.zeros(1), torch.zeros(1), torch.zeros(1), ["a"])
    cond, uncond = prior.encode_text(["a", "a"]), prior.encode_text(["", ""])
    x = sample_latents(prior, cond, uncond, (2, 3, 4, 4), steps=8,
                       generator=torch.Generator().manual_seed(3))
    assert torch.allclose(x, prior.encode(image).expand(2, -1, -1, -1), atol=1e-4)


@torch.no_grad()
def test_every_object_fits_in_the_view_of_the_nearest_dataset_camera():
    """Every splat, out to where the renderer stops drawing it, lies in the ball that a dataset
    camera at its nearest distance and narrowest field of view always sees whole."""
    from cfd.renderers.projection import ALPHA_THRESHOLD, MAX_EXTENT_SIGMAS, quat_to_rotmat

    cfg = ShapeDatasetConfig()
    visible = min(cfg.distance_range) * math.sin(math.radians(min(cfg.fov_range)) / 2)
    for obj in SHAPE_WORLD:
        splats = object_splats(obj)
        scales = splats.scales
        # How many standard deviations out the renderer draws each splat (alpha >= 1/255).
        drawn = torch.sqrt(2 * torch.log(splats.opacities / ALPHA_THRESHOLD))
        drawn = drawn.clamp(max=MAX_EXTENT_SIGMAS)
        # The drawn ellipsoid lies in a cylinder along its thinnest axis; bound the reach of the
        # cylinder from the splat's centre, split along that axis and across it.
        local = torch.einsum("nji,nj->ni", quat_to_rotmat(splats.quats), splats.means)
        thin = scales.argmin(-1, keepdim=True)
        along = local.gather(-1, thin)[:, 0].abs()
        across = (local.square().sum(-1) - along.square()).clamp(min=0).sqrt()
        reach = torch.hypot(along + drawn * scales.gather(-1, thin)[:, 0],
                            across + drawn * scales.max(-1).values)
        assert reach.max() <= visible, (obj.name, reach.max().item(), visible)


def test_equal_settings_spelled_differently_share_a_dataset(tmp_path):
    base = ShapeDatasetConfig(cache_dir=str(tmp_path))
    for spelled in (dict(elevation_range=[-10, 45]), dict(elevation_range=(-10.0, 45.0)),
                    dict(fov_range=(40, 40)), dict(resolution=64.0), dict(seed=0.0),
                    dict(background=1 / 2)):
        assert dataset_dir(ShapeDatasetConfig(cache_dir=str(tmp_path), **spelled)) == \
            dataset_dir(base), spelled
    assert dataset_dir(ShapeDatasetConfig(cache_dir=str(tmp_path), resolution=32)) != \
        dataset_dir(base)
    with pytest.raises(ValueError, match=r"resolution must be a whole number, got 64\.5"):
        dataset_dir(ShapeDatasetConfig(resolution=64.5))


def _one_object_config(tmp_path, monkeypatch):
    """A one-view, one-object dataset: the cheapest real build."""
    monkeypatch.setattr(shape_dataset, "prior_objects", lambda: SHAPE_WORLD[:1])
    return ShapeDatasetConfig(views_per_object=1, resolution=8, cache_dir=str(tmp_path))


def test_a_broken_dataset_folder_is_rebuilt(tmp_path, monkeypatch):
    """A folder without meta.json (an interrupted copy, a writer that was not atomic) is no
    dataset: the build replaces it rather than returning it; a complete one is kept."""
    cfg = _one_object_config(tmp_path, monkeypatch)
    folder = dataset_dir(cfg)
    folder.mkdir(parents=True)
    (folder / "images.safetensors").write_bytes(b"partial")
    assert build_shape_dataset(cfg) == folder
    assert ClosedFormPrior.from_pretrained(folder).data.shape == (1, 3 * 8 * 8)
    left = sorted(p.name for p in folder.parent.iterdir())
    assert left == [folder.name, f"{folder.name}.lock"]  # nothing left aside
    # Another process's complete build, found at the rename: theirs stays, ours goes.
    ours = tmp_path / "shape_world" / "ours.tmp"
    ours.mkdir()
    (ours / "meta.json").write_text("{}")
    before = (folder / "meta.json").read_text()
    shape_dataset.publish(ours, folder)
    assert (folder / "meta.json").read_text() == before and not ours.exists()


def test_runs_side_by_side_render_the_dataset_once(tmp_path, monkeypatch, caplog):
    """A run that finds another one rendering the same dataset waits for it and reads its
    result instead of rendering it again."""
    cfg = _one_object_config(tmp_path, monkeypatch)
    folder = dataset_dir(cfg)
    render_and_publish = shape_dataset._render_and_publish
    renders = []
    monkeypatch.setattr(shape_dataset, "_render_and_publish",
                        lambda *args: (renders.append(args), render_and_publish(*args)))
    found = {}
    with shape_dataset.build_lock(folder):  # the other run, rendering
        waiter = threading.Thread(target=lambda: found.update(folder=build_shape_dataset(cfg)))
        waiter.start()
        deadline = time.monotonic() + 60
        while "waiting for another process to finish rendering" not in caplog.text:
            assert time.monotonic() < deadline and waiter.is_alive()
            time.sleep(0.01)
        render_and_publish(cfg, folder, 25)
    waiter.join(60)
    assert found == {"folder": folder} and renders == []


def test_dataset_files_follow_the_umask(tmp_path, monkeypatch):
    cfg = _one_object_config(tmp_path, monkeypatch)
    umask = os.umask(0o027)
    try:
        folder = build_shape_dataset(cfg)
    finally:
        os.umask(umask)
    assert stat.S_IMODE(folder.stat().st_mode) == 0o750
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in folder.iterdir()}
    assert modes == {"images.safetensors": 0o640, "meta.json": 0o640}


def test_chunk_size_must_be_a_positive_whole_number():
    images = torch.rand(3, 4, 4, 3)
    for bad in (0, -1, 2.5):
        with pytest.raises(ValueError, match=r"chunk_size \(images per streamed chunk\) must be "
                                             r"a whole number >= 1"):
            ClosedFormPrior(images, torch.zeros(3), torch.zeros(3), torch.zeros(3), ["a"],
                            chunk_size=bad)


def test_t_zero_gives_the_nearest_image_and_no_noise_estimate():
    """At t = 0 the denoiser's limit is the nearest image of the condition; the noise, which
    a sample-predicting prior infers by dividing by sigma = 0, is undefined and an error."""
    prior = _tiny_prior()
    images = prior.data[[1, 4]].float().reshape(2, 3, 4, 4)  # prompts "b" and "a"
    x = images + 0.01 * torch.randn(images.shape, generator=torch.Generator().manual_seed(5))
    cond = prior.encode_text(["", "a"])
    assert torch.allclose(prior.model_output(x, torch.zeros(2), cond), images, atol=1e-6)
    mixed = prior.model_output(x, torch.tensor([0.0, 0.5]), cond)
    assert torch.isfinite(mixed).all() and torch.allclose(mixed[0], images[0], atol=1e-6)
    with pytest.raises(ValueError, match=r"noise is undefined at t = 0.*model_output"):
        prior.predict_eps(x, 0.0, cond, prior.encode_text(["", ""]))


def test_an_empty_batch_is_a_clear_error():
    prior = _tiny_prior()
    with pytest.raises(ValueError, match=r"at least one rendered view, got an empty batch"):
        prior(torch.rand(0, 4, 4, 3), _Views(torch.zeros(0), torch.zeros(0)),
              _constant_prompt(prior), 0.5, torch.randn(0, 3, 4, 4))


def test_guidance_takes_cameras_built_from_poses_alone(tmp_path):
    """Cameras built with look_at (or from OpenGL poses) carry no recorded angles; the view
    prompts still see where they are."""
    prior = _tiny_prior()
    processor = PromptProcessor(PromptConfig(prompt="a", cache_dir=str(tmp_path)), prior)
    eye = torch.tensor([[3.0, 0.0, 0.5], [0.0, 3.0, 0.5], [-3.0, 0.0, 0.5]])
    cams = Cameras(look_at(eye, torch.zeros(3, 3)),
                   intrinsics_from_fov(torch.full((3,), 40.0), 4, 4), 4, 4)
    cond, _ = prior.conditions(processor, cams)
    assert cond["direction"].tolist() == [0, 1, 2]  # front, side, back
    out = prior(torch.rand(3, 4, 4, 3), cams, processor, 0.5, torch.randn(3, 3, 4, 4))
    assert torch.isfinite(out["loss_sds"])


def test_diagonal_views_cut_the_circle_into_eight_sectors(dataset, tmp_path):
    """With ``diagonal_views`` each 45-degree sector has its own text, and the prior draws a
    view from its own sector's images only."""
    from cfd.systems.prior import GuidanceConfig, build_guidance

    views = PromptConfig(prompt="a mug", split_sides=True, diagonal_views=True,
                         overhead_threshold=30.0, cache_dir=str(tmp_path))
    azimuth = torch.tensor([0.0, 20.0, 45.0, 90.0, 135.0, 180.0, -135.0, -90.0, -45.0, -25.0])
    directions = view_directions(torch.zeros(10), azimuth, views).tolist()
    assert directions == [0, 0, 5, 1, 6, 2, 7, 4, 8, 8]
    assert view_directions(torch.tensor([40.0]), torch.tensor([45.0]), views).tolist() == [3]

    prior = build_guidance(GuidanceConfig(dataset=dataset[0]), "cpu", views)
    processor = PromptProcessor(views, prior)
    assert processor.texts[5:] == ["a mug, front left view", "a mug, back left view",
                                   "a mug, back right view", "a mug, front right view"]
    cond, _ = processor(torch.zeros(1), torch.tensor([135.0]))
    mask = prior.subset_mask(int(cond["prompt"][0]), int(cond["direction"][0]))
    assert mask.any() and (prior.direction[mask] == 6).all()
    with pytest.raises(UserError, match="split_sides=true"):
        view_directions(torch.zeros(1), torch.zeros(1), PromptConfig(diagonal_views=True))
