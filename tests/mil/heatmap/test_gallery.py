"""Top-tile gallery: square tiles at their full footprint, white past the slide edge."""

from __future__ import annotations

import numpy as np

from mil.heatmap.gallery import FRAME_COLOR, GalleryTile, render_gallery, square_tile

TILE_PX = 40


class BlackSlide:
    """A 1000 x 1000 level-0 slide whose reader returns black everywhere, even past the edge."""

    dimensions = (1000, 1000)

    def read_tile(
        self, x: int, y: int, tile_px_level0: float, read_level: int, tile_px: int
    ) -> np.ndarray:
        return np.zeros((tile_px, tile_px, 3), dtype=np.uint8)


def _tile(x: int, y: int) -> GalleryTile:
    return GalleryTile(group="highest", rank=1, row=0, x=x, y=y, score=1.0, normalized=1.0)


def _bounding_box(mask: np.ndarray) -> tuple[int, int, int, int]:
    rows, columns = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    return int(columns[0]), int(rows[0]), int(columns[-1]) + 1, int(rows[-1]) + 1


def test_square_tile_whitens_past_edge() -> None:
    pixels = np.zeros((TILE_PX, TILE_PX, 3), dtype=np.uint8)

    square = square_tile(pixels, 900, 950, 200.0, TILE_PX, (1000, 1000))

    assert square.shape == (TILE_PX, TILE_PX, 3)
    assert (square[:10, :20] == 0).all()
    assert (square[:, 20:] == 255).all()
    assert (square[10:, :] == 255).all()


def test_square_tile_pads_cropped_read() -> None:
    cropped = np.zeros((TILE_PX, 25, 3), dtype=np.uint8)

    square = square_tile(cropped, 0, 0, 200.0, TILE_PX, None)

    assert square.shape == (TILE_PX, TILE_PX, 3)
    assert (square[:, :25] == 0).all()
    assert (square[:, 25:] == 255).all()


def test_gallery_edge_tile_drawn_square() -> None:
    image = np.asarray(
        render_gallery(BlackSlide(), [_tile(900, 0)], 200.0, tile_px=TILE_PX, title="edge")
    )

    frame = (image == FRAME_COLOR).all(axis=-1)
    left, top, right, bottom = _bounding_box(frame)
    assert right - left == TILE_PX + 2
    assert bottom - top == TILE_PX + 2
    black = (image == 0).all(axis=-1)
    black_left, black_top, black_right, black_bottom = _bounding_box(black)
    assert (black_right - black_left, black_bottom - black_top) == (TILE_PX // 2, TILE_PX)
    assert (image[top + 1 : bottom - 1, left + 1 + TILE_PX // 2 : right - 1] == 255).all()


def test_gallery_title_notes_edge() -> None:
    inside = render_gallery(BlackSlide(), [_tile(0, 0)], 200.0, tile_px=TILE_PX, title="t")
    edge = render_gallery(BlackSlide(), [_tile(900, 0)], 200.0, tile_px=TILE_PX, title="t")

    assert inside.size == edge.size
    assert np.asarray(inside)[:20].tolist() != np.asarray(edge)[:20].tolist()
