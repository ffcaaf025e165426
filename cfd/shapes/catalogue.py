"""The objects the embedded prior knows, and their prompts.

Two kinds, in this order (the order of the prior's dataset and of ``prompts()``):

* the named objects of ``world.SHAPE_WORLD`` (14 objects in 7 prompts, "a mug" first), and
* fixed variants of every category that has no named member: the instances of its first
  ``VARIANTS_PER_CATEGORY`` training seeds (``categories.train_seeds``), under the category's
  prompt ("a stool", "a barn", ...).

A category with named members ("a mug", "a chair", ...) is represented by them alone: they are
its fixed members (``Category.fixed``), and adding drawn instances to their prompt would change
what the prior makes of it.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Dict, List, Tuple

from core.errors import UserError

from .categories import CATEGORIES, train_seeds
from .world import SHAPE_WORLD, ShapeObject

VARIANTS_PER_CATEGORY = 3


def variant_categories() -> List[str]:
    """The categories the prior knows by drawn variants (those without named members), in
    ``CATEGORIES``' order."""
    return [name for name, c in CATEGORIES.items() if not c.fixed]


def variant_seeds() -> List[int]:
    """The seeds of every such category's variants: its first ``VARIANTS_PER_CATEGORY``
    training seeds."""
    return train_seeds(VARIANTS_PER_CATEGORY)


@lru_cache(maxsize=None)
def prior_objects() -> Tuple[ShapeObject, ...]:
    """Every object of the prior's dataset: the named ones, then each new category's variants
    (drawn once per process: sampling fits each instance to the cameras' view)."""
    variants = tuple(CATEGORIES[name].sample(seed) for name in variant_categories()
                     for seed in variant_seeds())
    return SHAPE_WORLD + variants


def prompts() -> List[str]:
    """The prompts the embedded prior knows, in a fixed order: the named objects' first."""
    seen: Dict[str, None] = {}
    for prompt in [o.prompt for o in SHAPE_WORLD] + [c.prompt for c in CATEGORIES.values()]:
        seen.setdefault(prompt, None)
    return list(seen)


def objects_for(prompt: str) -> List[ShapeObject]:
    """The variants of a prompt; an unknown prompt is an error that lists the known ones."""
    if prompt not in prompts():
        known = "\n  ".join(prompts())
        raise UserError(f"unknown prompt {prompt!r} for the embedded prior; it knows:\n  {known}")
    # A named prompt's objects are all named, so the categories are sampled only when needed.
    named = [o for o in SHAPE_WORLD if o.prompt == prompt]
    return named or [o for o in prior_objects() if o.prompt == prompt]


__all__ = ["VARIANTS_PER_CATEGORY", "objects_for", "prior_objects", "prompts", "variant_categories",
           "variant_seeds"]
