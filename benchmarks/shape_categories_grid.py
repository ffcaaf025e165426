"""A picture of the shape categories: one row per category, one dataset view per seed.

    python benchmarks/shape_categories_grid.py out.png [--seeds 3] [--resolution 128]

Each tile is ``cfd.shapes.render_views(sample, 1, resolution, seed)`` (a camera drawn in the
prior dataset's ranges, on its grey background); the category's name heads its row.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cfd.shapes import CATEGORIES, render_views  # noqa: E402

LABEL_WIDTH = 90  # pixels left of each row for the category's name


def category_grid(seeds: int, resolution: int) -> Image.Image:
    """Rows of ``seeds`` tiles (seeds 0 .. seeds - 1), one row per category."""
    grid = Image.new("RGB", (LABEL_WIDTH + seeds * resolution, len(CATEGORIES) * resolution),
                     "white")
    draw = ImageDraw.Draw(grid)
    for row, (name, cat) in enumerate(CATEGORIES.items()):
        draw.text((4, row * resolution + resolution // 2), name, fill="black")
        for col in range(seeds):
            rgba, _ = render_views(cat.sample(col), 1, resolution, seed=col)
            tile = (rgba[0, ..., :3].numpy() * 255 + 0.5).astype(np.uint8)
            grid.paste(Image.fromarray(tile), (LABEL_WIDTH + col * resolution, row * resolution))
    return grid


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path, help="where to write the PNG")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--resolution", type=int, default=128)
    args = parser.parse_args()
    start = time.perf_counter()
    category_grid(args.seeds, args.resolution).save(args.out)
    print(f"wrote {args.out} ({len(CATEGORIES)} categories x {args.seeds} seeds) in "
          f"{time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    main()
