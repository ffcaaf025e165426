"""The generator's training data: occupancy grids and conditioning renders of the shape world's
categories, one instance per (category, seed), split by seed.

Built once per (settings, code) with a progress bar and cached under
``<cache root>/generator_data/<fingerprint>/`` the way ``cfd.shapes.dataset`` caches the prior's
images (``build_lock`` so parallel first runs build it once, a temporary folder published by one
rename, so a killed build leaves nothing a later run would read). The fingerprint hashes the
settings and the source of everything that draws the data (the shape world, the renderer, the
cameras, the splat conversions and this module). The folder holds ``train.safetensors`` and
``held_out.safetensors`` (see :class:`ShapeSet`) and ``meta.json``.

Stage 2's dataset (``slat_data``) is cached by the same code (:func:`build_cached`), under a
fingerprint of its own settings and sources.

Seeds: ``train_seeds(n)`` of every category for training, ``held_out_seeds(n)`` for metrics; the
two ranges never meet (``cfd.shapes.categories``).
"""

from __future__ import annotations

import json
import shutil
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor
from tqdm import tqdm

from cfd.shapes import (CATEGORIES, category, held_out_seeds, occupancy_grid, render_views,
                        train_seeds)
from cfd.shapes.dataset import build_lock, image_source_files, publish, source_fingerprint
from core.errors import UserError
from core.runtime import cache_root, share_as_created

SPLITS = ("train", "held_out")


@dataclass
class StructureDataConfig:
    """What the dataset holds. Sizes: see ``configs/train-generator-structure.yaml``."""

    train_seeds: int = 64  # instances per category for training
    held_out_seeds: int = 2  # instances per category for held-out metrics
    categories: List[str] = field(default_factory=list)  # empty: all of them
    occupancy_resolution: int = 32  # cells per side of the occupancy grid
    views: int = 2  # conditioning renders per instance
    # Pixels per side of the stored renders; preprocessing crops the object and resizes it to
    # the conditioner's 518 px, as it does for a user's image of any size.
    render_resolution: int = 96
    cache_dir: Optional[str] = None  # null: core.runtime.cache_root()


@dataclass
class ShapeSet:
    """One split of the dataset, N instances."""

    occupancy: Tensor  # [N, R, R, R] bool, indexed [x, y, z] (cfd.shapes.occupancy_grid)
    rgba: Tensor  # [N, V, H, W, 4] uint8: views on the grey background, alpha the coverage
    category: Tensor  # [N] int64, index into ``categories``
    seed: Tensor  # [N] int64, the instance's seed in its category
    categories: List[str]

    def __len__(self) -> int:
        return len(self.occupancy)


def check_categories(categories: List[str], key: str) -> None:
    """A :class:`UserError` naming ``key`` for category names the shape world does not have."""
    unknown = [name for name in categories if name not in CATEGORIES]
    if unknown:
        raise UserError(f"{key}: unknown {', '.join(unknown)}; known: "
                        f"{', '.join(CATEGORIES)} (an empty list takes them all)")


def check_counts(c: Any, names: Sequence[str], key: str) -> None:
    """A :class:`UserError` for any of the settings ``names`` of ``c`` below 1."""
    for name in names:
        if getattr(c, name) < 1:
            raise UserError(f"{key}.{name} must be >= 1, got {getattr(c, name)}")


def check_data_config(c: StructureDataConfig, key: str = "data") -> None:
    """A :class:`UserError` naming the setting for values that cannot build a dataset."""
    check_categories(c.categories, f"{key}.categories")
    check_counts(c, ("train_seeds", "held_out_seeds", "views", "render_resolution",
                     "occupancy_resolution"), key)
    check_render_resolution(c.render_resolution, key)


def check_render_resolution(value: int, key: str) -> None:
    """Renders must be large enough for preprocessing to find the object's box in them."""
    if value < 32:
        raise UserError(f"{key}.render_resolution={value} is too small for the object's box to "
                        "be found in it (the flow's condition); use >= 32")


def category_names(c: Any) -> List[str]:
    """The categories a dataset config ``c`` covers, in ``CATEGORIES`` order."""
    return [name for name in CATEGORIES if not c.categories or name in c.categories]


def data_fingerprint(c: Any, sources: Sequence[Path] = (Path(__file__),)) -> str:
    """Hash of a dataset config's settings (all but ``cache_dir``, categories in canonical
    order) and the bytes of every source file that draws the data: the shape world's and
    renderer's, and ``sources`` (the modules that draw this dataset)."""
    settings = {k: v for k, v in asdict(c).items() if k != "cache_dir"}
    settings["categories"] = category_names(c)
    return source_fingerprint(json.dumps(settings, sort_keys=True).encode(),
                              [*image_source_files(), *sources])


def data_dir(c: Any, sources: Sequence[Path] = (Path(__file__),)) -> Path:
    """``<cache_dir>/generator_data/<fingerprint>``: where the dataset of ``c`` is cached."""
    root = Path(c.cache_dir) if c.cache_dir else cache_root()
    return root / "generator_data" / data_fingerprint(c, sources)


# (dataset config, seeds, progress bar) -> the split's tensors, one bar step per instance
DrawSplit = Callable[[Any, List[int], tqdm], Dict[str, Tensor]]


def build_cached(c: Any, draw_split: DrawSplit, sources: Sequence[Path],
                 description: str) -> Path:
    """Draw (or find in the cache) the dataset of config ``c`` (``train_seeds``,
    ``held_out_seeds``, ``categories``, ``cache_dir`` and what ``draw_split`` reads); returns
    its folder of ``train.safetensors``, ``held_out.safetensors`` and ``meta.json``."""
    out_dir = data_dir(c, sources)
    if (out_dir / "meta.json").is_file():
        return out_dir
    with build_lock(out_dir):
        if not (out_dir / "meta.json").is_file():  # the process we waited for built it
            _draw_and_publish(c, draw_split, out_dir, description)
    return out_dir


def build_structure_data(c: StructureDataConfig) -> Path:
    """Draw (or find in the cache) the dataset ``c`` describes; returns its folder."""
    return build_cached(c, _draw_split, [Path(__file__)], "drawing the generator's shapes")


def view_seed(category_index: int, seed: int) -> int:
    """The camera seed of an instance's renders: distinct for every (category, seed)."""
    return seed * len(CATEGORIES) + category_index


def _draw_split(c: StructureDataConfig, seeds: List[int], bar: tqdm) -> Dict[str, Tensor]:
    """Occupancy, renders and labels of every category's instances of ``seeds``."""
    occupancy, rgba, labels, instance_seeds = [], [], [], []
    for index, name in enumerate(category_names(c)):
        for seed in seeds:
            obj = category(name).sample(seed)
            occupancy.append(occupancy_grid(obj, c.occupancy_resolution))
            views, _ = render_views(obj, c.views, c.render_resolution,
                                    seed=view_seed(list(CATEGORIES).index(name), seed))
            rgba.append((views * 255 + 0.5).to(torch.uint8))
            labels.append(index)
            instance_seeds.append(seed)
            bar.update(1)
    return {"occupancy": torch.stack(occupancy).to(torch.uint8), "rgba": torch.stack(rgba),
            "category": torch.tensor(labels), "seed": torch.tensor(instance_seeds)}


def _draw_and_publish(c: Any, draw_split: DrawSplit, out_dir: Path, description: str) -> None:
    from safetensors.torch import save_file

    names = category_names(c)
    split_seeds = {"train": train_seeds(c.train_seeds),
                   "held_out": held_out_seeds(c.held_out_seeds)}
    bar = tqdm(total=len(names) * (c.train_seeds + c.held_out_seeds), desc=description,
               unit="shape")
    tmp = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=out_dir.name + ".tmp"))
    try:
        for split, seeds in split_seeds.items():
            save_file(draw_split(c, seeds, bar), str(tmp / f"{split}.safetensors"))
        bar.close()
        meta = {"categories": names, "settings": {**asdict(c), "categories": names},
                "fingerprint": out_dir.name}
        meta["settings"].pop("cache_dir")
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2))
        for path in (tmp, *tmp.iterdir()):
            share_as_created(path)
        publish(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def read_split(folder: Path, split: str) -> Tuple[Dict[str, Tensor], List[str]]:
    """The tensors of split ``split`` (``train`` or ``held_out``) of a built dataset folder,
    and its categories."""
    from safetensors.torch import load_file

    if split not in SPLITS:
        raise ValueError(f"split is one of {SPLITS}, got {split!r}")
    meta = json.loads((Path(folder) / "meta.json").read_text())
    return load_file(str(Path(folder) / f"{split}.safetensors")), meta["categories"]


def load_shape_set(folder: Path, split: str) -> ShapeSet:
    """Split ``split`` (``train`` or ``held_out``) of a built dataset folder."""
    tensors, categories = read_split(folder, split)
    return ShapeSet(occupancy=tensors["occupancy"].bool(), rgba=tensors["rgba"],
                    category=tensors["category"], seed=tensors["seed"], categories=categories)
