"""Heatmap figures: scores blended over the slide thumbnail, a colour bar and a caption.

The figure places the map at its top-left corner, so figure pixel (i, j) inside the map is
thumbnail pixel (i, j). The colour bar is on the right and the caption below.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from mil.heatmap.colormap import Colormap, apply_colormap
from mil.heatmap.normalize import NormalizedScores

BACKGROUND = (255, 255, 255)
TEXT_COLOR = (20, 20, 20)


def blend_scores(
    thumbnail: np.ndarray,
    scores: np.ndarray,
    coverage: np.ndarray,
    colormap: Colormap | str = Colormap.viridis,
    opacity: float = 0.5,
) -> np.ndarray:
    """Blend coloured scores over the thumbnail where tiles cover it.

    Args:
        thumbnail: uint8 [H, W, 3] RGB.
        scores: float [H, W] in [0, 1], the painted normalised scores.
        coverage: float [H, W] tile coverage of each pixel; pixels without tiles keep the
            thumbnail colour, partly covered edge pixels are blended in proportion.
        colormap: colour map of the scores.
        opacity: weight of the score colour on fully covered pixels, in [0, 1].

    Returns:
        uint8 [H, W, 3] RGB.
    """
    if thumbnail.shape[:2] != scores.shape or scores.shape != coverage.shape:
        raise ValueError(
            f"thumbnail {thumbnail.shape[:2]}, scores {scores.shape} and coverage "
            f"{coverage.shape} must have one size"
        )
    # NOTE: coverage sums overlapping tiles, so an edge pixel half covered by two overlapping
    # tiles counts as fully covered and is drawn at full opacity.
    alpha = np.clip(coverage, 0.0, 1.0).astype(np.float32)
    alpha *= float(opacity)
    # thumbnail + alpha * (colour - thumbnail), in place to keep one float plane per channel.
    blended = apply_colormap(scores, colormap).astype(np.float32)
    base = thumbnail[..., :3].astype(np.float32)
    blended -= base
    blended *= alpha[..., None]
    blended += base
    np.rint(blended, out=blended)
    return blended.astype(np.uint8)


def _font(size: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    return ImageFont.load_default(size=size)


def _text_size(draw: ImageDraw.ImageDraw, text: str, font: object) -> tuple[int, int]:
    left, top, right, bottom = draw.textbbox((0, 0), text, font=font)  # type: ignore[arg-type]
    return int(right - left), int(bottom - top)


def _colorbar(
    height: int,
    normalized: NormalizedScores,
    colormap: Colormap | str,
    font_px: int,
) -> Image.Image:
    """Vertical colour bar (high scores on top) with ticks and the normalisation as its title."""
    font = _font(font_px)
    bar_width = max(12, font_px)
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    tick_width = max(_text_size(probe, text, font)[0] for text in normalized.tick_labels)
    label_width, label_height = _text_size(probe, normalized.label, font)
    pad = max(4, font_px // 2)
    bar_height = max(1, height - 2 * pad)
    width = pad + bar_width + pad + tick_width + pad + label_height + 2 * pad

    panel = Image.new("RGB", (width, height), BACKGROUND)
    ramp = np.linspace(1.0, 0.0, bar_height, dtype=np.float32)[:, None].repeat(bar_width, 1)
    panel.paste(Image.fromarray(apply_colormap(ramp, colormap)), (pad, pad))
    draw = ImageDraw.Draw(panel)
    draw.rectangle(
        (pad - 1, pad - 1, pad + bar_width, pad + bar_height), outline=TEXT_COLOR, width=1
    )
    for value, text in zip(normalized.tick_values, normalized.tick_labels, strict=True):
        y = pad + round((1.0 - value) * (bar_height - 1))
        draw.line((pad + bar_width, y, pad + bar_width + pad // 2, y), fill=TEXT_COLOR)
        _, text_height = _text_size(draw, text, font)
        top = min(max(0, y - text_height // 2), height - text_height - 1)
        draw.text((pad + bar_width + pad, top), text, fill=TEXT_COLOR, font=font)

    # The title runs bottom to top beside the bar; it is cut if the map is very short.
    title = Image.new("RGB", (label_width + 2 * pad, label_height + pad), BACKGROUND)
    ImageDraw.Draw(title).text((pad, 0), normalized.label, fill=TEXT_COLOR, font=font)
    title = title.rotate(90, expand=True)
    title_top = max(0, (height - title.height) // 2)
    panel.paste(title, (pad + bar_width + pad + tick_width + pad, title_top))
    return panel


def render_figure(
    map_rgb: np.ndarray,
    normalized: NormalizedScores,
    colormap: Colormap | str,
    caption: Sequence[str],
    font_px: int | None = None,
) -> Image.Image:
    """Assemble the heatmap figure: map at (0, 0), colour bar on the right, caption below.

    Args:
        map_rgb: uint8 [H, W, 3], the blended map (see `blend_scores`).
        normalized: the normalisation, for the colour bar's ticks and title.
        colormap: colour map used for the map.
        caption: lines of text under the map (slide, prediction, head, normalisation).
        font_px: text size in pixels; by default it grows with the map (12 px at most 1200).

    Returns:
        RGB image of size (W + colour bar width, H + caption height).
    """
    height, width = map_rgb.shape[:2]
    if font_px is None:
        font_px = max(12, round(max(width, height) / 100))
    bar = _colorbar(max(height, 8 * font_px), normalized, colormap, font_px)

    font = _font(font_px)
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    line_height = max(_text_size(probe, "Ag", font)[1], font_px) + font_px // 3
    caption_width = max((_text_size(probe, line, font)[0] for line in caption), default=0)
    pad = max(4, font_px // 2)
    caption_height = pad + line_height * len(caption) + pad if caption else 0

    figure_width = max(width + bar.width, caption_width + 2 * pad)
    figure_height = max(height, bar.height) + caption_height
    figure = Image.new("RGB", (figure_width, figure_height), BACKGROUND)
    figure.paste(Image.fromarray(map_rgb), (0, 0))
    figure.paste(bar, (width, 0))
    draw = ImageDraw.Draw(figure)
    top = max(height, bar.height) + pad
    for line in caption:
        draw.text((pad, top), line, fill=TEXT_COLOR, font=font)
        top += line_height
    return figure
