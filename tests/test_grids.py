"""Sample grids: a visible gap between tiles, small tiles upscaled to a readable size without blurring."""

import numpy as np
import pytest
from PIL import Image

from immiscible_diffusers.training import GRID_BACKGROUND, image_grid


def _tiles(count: int, size: int, mode: str = "L") -> list[Image.Image]:
    # Tile i is filled with the value 10 * (i + 1): white-ish ink on black would hide a missing gap, distinct
    # flat values make every tile's footprint checkable.
    return [Image.new(mode, (size, size), 10 * (index + 1) if mode == "L" else (10 * (index + 1),) * 3) for index in range(count)]


def test_small_tiles_are_upscaled_with_nearest_neighbour_and_separated_by_grey_gaps():
    grid = image_grid(_tiles(4, 16), min_tile_size=48, gap=2)
    assert grid.mode == "L" and grid.size == (2 * (48 + 2) + 2, 2 * (48 + 2) + 2)
    pixels = np.asarray(grid)
    grey = GRID_BACKGROUND[0]
    # Border, the gap column between the two tile columns and the gap row are all background.
    assert (pixels[:2, :] == grey).all() and (pixels[:, :2] == grey).all()
    assert (pixels[:, 50:52] == grey).all() and (pixels[50:52, :] == grey).all()
    # Each tile is one flat block of exactly its own value (nearest neighbour: no blending with the gap).
    for index, (top, left) in enumerate([(2, 2), (2, 52), (52, 2), (52, 52)]):
        assert (pixels[top : top + 48, left : left + 48] == 10 * (index + 1)).all()


def test_large_tiles_keep_their_size_and_rgb_and_incomplete_rows_work():
    grid = image_grid(_tiles(3, 64, "RGB"), columns=2)
    assert grid.mode == "RGB" and grid.size == (2 * 66 + 2, 2 * 66 + 2)
    assert tuple(np.asarray(grid)[100, 100]) == GRID_BACKGROUND  # the empty fourth cell


def test_pixels_of_an_upscaled_digit_stay_sharp():
    digit = Image.fromarray((np.arange(64).reshape(8, 8) * 4).astype(np.uint8), mode="L")
    tile = np.asarray(image_grid([digit], min_tile_size=48, gap=0))
    assert tile.shape == (48, 48)
    np.testing.assert_array_equal(tile, np.kron(np.asarray(digit), np.ones((6, 6), dtype=np.uint8)))


@pytest.mark.parametrize(
    ("images", "kwargs", "message"),
    [
        ([], {}, "images must not be empty"),
        (_tiles(1, 8) + _tiles(1, 16), {}, "images must all have one size"),
        (_tiles(1, 8), {"gap": -1}, "gap >= 0"),
    ],
)
def test_bad_input_is_refused(images, kwargs, message):
    with pytest.raises(ValueError, match=message):
        image_grid(images, **kwargs)
