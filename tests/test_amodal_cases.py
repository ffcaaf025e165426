"""Amodal cases (cfd.evaluation.amodal): occlusions in their bands, what is visible and hidden,
which categories share the visible parts."""

import pytest
import torch

from cfd.evaluation.amodal import (BANDS, AmodalCase, ambiguous_categories, hidden_points,
                                   hidden_region, make_cases, observe, occluder_mask)
from cfd.shapes import occupancy_grid
from cfd.shapes.categories import surface_points


@pytest.fixture(scope="module")
def cases():
    return make_cases(1, seed=3, resolution=96, categories=("chair", "mug"))


def test_cases_are_seeded_banded_and_their_observation_hides_that_share(cases):
    assert [c.case_id for c in cases] == [c.case_id for c in make_cases(
        1, seed=3, resolution=96, categories=("chair", "mug"))]
    assert [c.band for c in cases] == list(BANDS) * 2
    assert {c.occluder for c in cases} == {"cut", "card"}
    for case in cases:
        low, high = BANDS[case.band]
        assert low <= case.hidden_share < high
        rgba, visible, silhouette = observe(case)
        shown = (torch.from_numpy(visible) > 127).sum() / silhouette.sum()
        assert float(shown) == pytest.approx(1 - case.hidden_share, abs=1e-6)
        assert (rgba[..., 3] > 127).sum() == (visible > 127).sum()  # alpha is the visible mask
        assert AmodalCase.from_dict(case.to_dict()) == case


def test_cases_of_given_instances_take_one_seed_each():
    known = make_cases(1, seed=3, resolution=96, categories=("stool",), instance_seeds=[0, 1, 2])
    assert [(c.seed, c.band) for c in known] == list(zip([0, 1, 2], BANDS))
    with pytest.raises(ValueError, match="need 6 instance seeds, got 3"):
        make_cases(2, resolution=96, categories=("stool",), instance_seeds=[0, 1, 2])


def test_occluders_cover_what_they_say():
    cut = occluder_mask("cut", (0.0, 0.0), 8)  # the lost side: right of the centre line
    assert cut[:, 4:].all() and not cut[:, :4].any()
    card = occluder_mask("card", (2.0, 6.0, 1.0, 1.0), 8)
    assert card.sum() == 4 and card[5:7, 1:3].all()
    with pytest.raises(ValueError, match="known: cut, card"):
        occluder_mask("wall", (), 8)


def test_ambiguity_follows_the_shared_parts():
    assert set(ambiguous_categories("chair", ["legs"])) >= {"stool", "table", "bench"}
    assert ambiguous_categories("chair", ["backrest", "legs"]) == ("bench",)
    assert ambiguous_categories("chair", []) == ()


def test_hidden_region_is_what_the_observation_does_not_show(cases):
    case = next(c for c in cases if c.category == "mug" and c.band == "30-60")
    truth = occupancy_grid(case.instance, 24)
    hidden = hidden_region(case, 24)
    assert not (hidden & ~truth).any() and 0 < hidden.sum() < truth.sum()
    # with nothing in front, the hidden part shrinks; with everything covered, it is all
    open_view = AmodalCase(**{**case.to_dict(), "occluder": "card",
                              "occluder_params": (-10.0, -10.0, 0.0, 0.0)})
    covered = AmodalCase(**{**case.to_dict(), "occluder": "card",
                            "occluder_params": (48.0, 48.0, 60.0, 60.0)})
    assert hidden_region(open_view, 24).sum() < hidden.sum()
    assert torch.equal(hidden_region(covered, 24), truth)
    points = surface_points(case.instance, 2000, torch.Generator().manual_seed(0))
    seen_open = (~hidden_points(open_view, points)).float().mean()
    assert 0.2 < seen_open < 0.8  # about the front half of the surface
