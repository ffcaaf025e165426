"""The held-out score against the shape world: its ground-truth renders and its search over
variants and turns."""

import torch

from cfd.cameras import fixed_orbit_cameras, orbit_cameras
from cfd.renderers import render
from cfd.shapes import object_splats, objects_for
from cfd.systems.ground_truth import evaluate_against_shape_world, truth_renders


def test_truth_renders_are_each_turn_of_the_orbit_rendered_on_its_own():
    """Rendering each distinct turned camera once gives what rendering every turn of the orbit
    does (the shared cameras are not mixed up between turns). A few pixels differ slightly: the
    rasteriser's chunking, hence its rounding near the transmittance stop, depends on the batch."""
    cams = fixed_orbit_cameras(8, 24, 24, 20.0, 2.5, 40.0)
    truth = truth_renders("a mug", cams, 40.0, rotation_step=30.0, background=0.5)
    mugs = objects_for("a mug")
    assert list(truth) == [obj.name for obj in mugs]
    for obj in mugs:
        rgb, alpha = truth[obj.name]
        assert rgb.shape == (12, 8, 24, 24, 3) and alpha.shape == (12, 8, 24, 24, 1)
        for k, delta in enumerate(torch.arange(0.0, 360.0, 30.0)):
            turned = orbit_cameras(cams.elevation, cams.azimuth + delta, cams.distance,
                                   torch.full_like(cams.distance, 40.0), 24, 24)
            direct = render(object_splats(obj), turned, background=0.5)
            for ours, theirs in ((rgb[k], direct.rgb), (alpha[k], direct.alpha)):
                error = (ours - theirs).abs()
                assert error.mean() < 1e-5 and error.max() < 1e-2, (k, error.max())


def test_a_turned_variant_is_found_with_its_turn():
    """The prompt's second variant turned by 70 degrees scores as itself, matched by the
    truth's cameras turned back (290 degrees), with a near-perfect PSNR and full mask overlap."""
    obj = objects_for("a mug")[1]
    scene = object_splats(obj).turned(70.0)
    best = evaluate_against_shape_world(scene, "a mug", resolution=32, background=1.0)
    assert best["variant"] == obj.name and best["rotation_deg"] == 290.0
    assert best["psnr"] > 50.0 and best["mask_iou"] > 0.99
