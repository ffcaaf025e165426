"""The embedded configs: those of the jobs on the embedded generator parse into their jobs'
typed configs and the settings they add are checked; the two distillation configs compare like
for like."""

import dataclasses

import pytest

from cfd.config import load_config
from core.errors import UserError
import run
from jobs import distill, generate, refine, relaxflow


@pytest.mark.parametrize("job, path", [(generate, "configs/generate-embedded.yaml"),
                                       (relaxflow, "configs/relaxflow-embedded.yaml"),
                                       (refine, "configs/refine-embedded.yaml")])
def test_embedded_configs_parse(job, path):
    c = job.typed(load_config(job.Config, path, []))
    model = c.relaxflow.model if job is refine else c.model
    assert model == "embedded"


def test_cfd_and_sds_differ_in_the_method_alone_and_view_as_the_prior_does():
    """Issue 22's comparison shares the prior, cameras, scene and budget: the two configs differ
    in their noise and timesteps only; and the training cameras are drawn as the prior's images
    were (one distance and field of view), else every view is pulled towards another scale."""
    cfd, sds = (distill.typed(load_config(distill.Config, f"configs/{m}-splats-embedded.yaml", []))
                for m in ("cfd", "sds"))
    differ = {f.name for f in dataclasses.fields(cfd) if getattr(cfd, f.name) != getattr(sds, f.name)}
    assert differ == {"name", "noise", "timesteps"}
    assert cfd.camera.distance_range == cfd.guidance.dataset.distance_range == [2.5, 2.5]
    assert cfd.camera.fov_range == cfd.guidance.dataset.fov_range


def test_refine_embedded_keeps_the_generators_frame_and_scales_it_to_the_world():
    c = refine.typed(load_config(refine.Config, "configs/refine-embedded.yaml", []))
    assert c.face_observation is False
    assert c.distill.splats.init.scale_by == pytest.approx(1.6)
    assert c.distill.splats.init.fit_radius is None


def test_a_ply_is_rescaled_one_way(tmp_path):
    c = distill.typed(load_config(distill.Config, "configs/cfd-splats-embedded.yaml", [
        "splats.init.kind=ply", f"splats.init.path={tmp_path / 'x.ply'}",
        "splats.init.fit_radius=0.6", "splats.init.scale_by=1.6", f"output_dir={tmp_path}"]))
    with pytest.raises(UserError, match="fit_radius and splats.init.scale_by both rescale"):
        distill.check(c)


def test_scale_by_multiplies_the_ply_about_the_origin(tmp_path):
    import torch

    from cfd.scene import random_ball
    from cfd.systems.scenes import InitConfig, InitKind, SplatScene, SplatSceneConfig

    ply = tmp_path / "x.ply"
    source = random_ball(50, 0.4, 0.02, 0.5, 0, generator=torch.Generator().manual_seed(0))
    source.save_ply(ply)
    cfg = SplatSceneConfig(init=InitConfig(kind=InitKind.ply, path=str(ply), scale_by=1.6))
    cfg.densify.enabled = False
    scene = SplatScene(cfg, torch.device("cpu"), torch.Generator()).scene
    torch.testing.assert_close(scene.means, source.means * 1.6)
    torch.testing.assert_close(scene.scales, source.scales * 1.6)


def test_max_splats_merges_the_ply_after_scaling_and_its_visibility_with_it(tmp_path):
    import torch

    from cfd.scene import group_mean, merge_to_count, random_ball
    from cfd.systems.scenes import InitConfig, InitKind, SplatScene, SplatSceneConfig

    ply = tmp_path / "x.ply"
    source = random_ball(400, 0.4, 0.02, 0.5, 0, generator=torch.Generator().manual_seed(0))
    visibility = torch.rand(400, generator=torch.Generator().manual_seed(1))
    source.save_ply(ply, {"visibility": visibility})

    def scene(max_splats):
        cfg = SplatSceneConfig(init=InitConfig(kind=InitKind.ply, path=str(ply), scale_by=1.6,
                                               max_splats=max_splats, lock_visible=True))
        cfg.densify.enabled = False
        return SplatScene(cfg, torch.device("cpu"), torch.Generator())

    merged = scene(100)
    want, group = merge_to_count(source.scaled(1.6), 100)
    assert 50 < len(merged.scene) == len(want) <= 100
    torch.testing.assert_close(merged.scene.means, want.means)
    torch.testing.assert_close(merged.change_weight, 1 - group_mean(
        visibility, source.opacities.detach(), group, len(want)))
    kept = scene(400)  # no more than allowed: every splat kept as it is
    torch.testing.assert_close(kept.scene.means, source.means * 1.6)
    torch.testing.assert_close(kept.change_weight, 1 - visibility)
    with pytest.raises(UserError, match="max_splats must be >= 1"):
        SplatScene.check(SplatSceneConfig(init=InitConfig(kind=InitKind.ply, path=str(ply),
                                                          max_splats=0)))


@pytest.mark.parametrize("extra, message", [
    (["mask=m.png"], "mask= and priors= belong to an observation"),
    (["generate.model=/nowhere/trellis"], "generate."),
    (["generate.draw.n_images=2"], "generate lifts one image")])
def test_refine_from_a_prompt_checks_its_start_before_any_folder(tmp_path, capsys, extra,
                                                                 message):
    out = tmp_path / "out"
    code = run.main(["refine", "--config", "configs/refine-embedded.yaml", "prompt=a mug",
                     f"output_dir={out}", *extra])
    err = capsys.readouterr().err
    assert code == 2 and message in err, err
    assert not out.exists()
