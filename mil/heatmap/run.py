"""The heatmap stage over many slides: `run_heatmaps(cfg)`.

Outputs per slide, in `<output_dir>/`:

    <slide_id>.png                 slide map over the thumbnail, colour bar, caption
    <slide_id>.<head>.png          one map per head or branch of [N, H] attention (per_head)
    <slide_id>.geojson             tile polygons with scores as QuPath measurements
    <slide_id>.top_tiles.png|csv   gallery and table of the top_k highest and lowest tiles
    <slide_id>.summary.json        written last; marks the slide as done for the attention
                                   content whose digest it records and the rendering
                                   settings it records

plus `<output_dir>/manifest.csv` with one row per slide.
"""

from __future__ import annotations

import logging
from pathlib import Path

from mil.heatmap.config import HeatmapConfig
from mil.heatmap.render import (
    attention_digest,
    is_complete_output,
    read_summary,
    render_settings,
    render_slide,
)
from preprocessing.errors import ConfigError, SlideOpenError, StoreFormatError
from preprocessing.inputs import SlideInput, list_slides
from preprocessing.jobs import SlideOutcome, StageResult, run_slides
from preprocessing.slide import open_slide
from preprocessing.stores import read_attention_store

logger = logging.getLogger(__name__)

STAGE = "heatmap"
ATTENTION_SUFFIX = ".h5"


def find_attention_stores(attention_dir: Path) -> tuple[Path, dict[str, Path]]:
    """Folder of the attention stores and the stores in it by slide id.

    `attention_dir` may be the folder of stores, a single store (one-slide mode), or a
    run/predict folder that contains `attention/`.

    Raises:
        ConfigError: the path does not exist.
    """
    path = Path(attention_dir)
    if path.is_file():
        return path.parent, {path.stem: path}
    if not path.is_dir():
        raise ConfigError(
            f"{path}: attention folder not found. Pass the `attention` folder written by "
            "`slidemil predict` (or one <slide_id>.h5 file from it)."
        )
    stores = sorted(path.glob(f"*{ATTENTION_SUFFIX}"))
    if not stores and (path / "attention").is_dir():
        path = path / "attention"
        stores = sorted(path.glob(f"*{ATTENTION_SUFFIX}"))
    return path, {store.stem: store for store in stores}


def _slide_overrides(spec: str | None) -> dict[str, Path]:
    if spec is None:
        return {}
    return {item.slide_id: item.path for item in list_slides(spec)}


def _job_list(
    cfg: HeatmapConfig, folder: Path, stores: dict[str, Path]
) -> list[SlideInput]:
    """Build one job per slide id whose path is its attention store (present or expected)."""
    ids = list(dict.fromkeys(cfg.slide_ids)) if cfg.slide_ids else sorted(stores)
    if not ids:
        raise ConfigError(
            f"{cfg.attention_dir}: no attention stores (*{ATTENTION_SUFFIX}) found. Run "
            "`slidemil predict` first, or pass its `attention` folder with --attention-dir."
        )
    return [
        SlideInput(slide_id, stores.get(slide_id, folder / f"{slide_id}{ATTENTION_SUFFIX}"))
        for slide_id in ids
    ]


def _output_is_current(cfg: HeatmapConfig, job: SlideInput) -> bool:
    """True for complete outputs made with the current rendering settings from attention with
    the content the store has now.

    Compares digests rather than modification times, so a store that `slidemil predict`
    rewrote with the same content keeps its outputs.
    """
    output_dir = Path(cfg.output_dir)
    if not is_complete_output(output_dir, job.slide_id) or not job.path.exists():
        return False
    summary = read_summary(output_dir, job.slide_id)
    settings = render_settings(cfg)
    if summary.get("render_settings") != settings:
        changed = sorted(
            name for name, value in settings.items()
            if (summary.get("render_settings") or {}).get(name) != value
        )
        logger.info("%s: rendering settings changed since the last render (%s); rendering again",
                    job.slide_id, ", ".join(changed))
        return False
    recorded = summary.get("attention_sha256")
    try:
        current = attention_digest(read_attention_store(job.path))
    except (StoreFormatError, OSError) as err:
        logger.debug("%s: cannot read %s for the resume check: %s", job.slide_id, job.path, err)
        return False
    if recorded != current:
        logger.info("%s: attention in %s changed since the last render; rendering again",
                    job.slide_id, job.path)
        return False
    return True


def render_one(cfg: HeatmapConfig, job: SlideInput, slide_path: Path | None) -> SlideOutcome:
    """Render one slide; `slide_path` overrides the store's `slide_path` attribute.

    Raises:
        StoreFormatError: the attention store is missing, incomplete or malformed.
        SlideOpenError: the slide file is missing or unreadable.
    """
    if not job.path.exists():
        raise StoreFormatError(
            f"{job.path}: attention file for slide {job.slide_id} not found. Run `slidemil "
            f"predict` on this slide, or leave out --slide-id {job.slide_id}."
        )
    store = read_attention_store(job.path)
    if slide_path is None:
        stored = str(store.attrs.get("slide_path") or "")
        if not stored:
            raise SlideOpenError(
                f"{job.path}: the store names no slide_path for slide {job.slide_id}; pass the "
                "slides with --slides (folder, glob or CSV)."
            )
        slide_path = Path(stored)
    if not slide_path.exists():
        raise SlideOpenError(
            f"{slide_path}: slide of {job.slide_id} not found (path from "
            f"{'--slides' if cfg.slides else job.path}). Pass the current location with "
            "--slides (folder, glob or CSV)."
        )
    with open_slide(slide_path, slide_id=job.slide_id) as slide:
        summary = render_slide(store, slide, Path(cfg.output_dir), cfg, slide_id=job.slide_id)
    dropped = summary["n_dropped_nan"]
    message = f"{dropped} tiles with NaN or infinite attention dropped" if dropped else ""
    return SlideOutcome(status="ok", n_tiles=summary["n_tiles"], message=message)


def run_heatmaps(cfg: HeatmapConfig) -> StageResult:
    """Write heatmaps, GeoJSON and galleries for every attention store, with a manifest.

    Slides whose complete outputs were made with the same rendering settings from attention
    with the same content (digest of the attention, coords and attributes) are skipped unless
    `cfg.overwrite`. A missing
    attention file or slide, or a malformed store, is a failed manifest row; with
    `skip_errors` the other slides still run.

    Returns:
        Counts of rendered, failed and skipped slides and the manifest path.

    Raises:
        ConfigError: no attention stores to render, or an invalid slide list or shard.
    """
    output_dir = Path(cfg.output_dir)
    folder, stores = find_attention_stores(Path(cfg.attention_dir))
    jobs = _job_list(cfg, folder, stores)
    overrides = _slide_overrides(cfg.slides)
    logger.info("Heatmaps for %d slides from %s into %s", len(jobs), cfg.attention_dir,
                output_dir)

    def process(job: SlideInput) -> SlideOutcome:
        return render_one(cfg, job, overrides.get(job.slide_id))

    def is_done(job: SlideInput) -> bool:
        return not cfg.overwrite and _output_is_current(cfg, job)

    return run_slides(
        jobs, process, stage=STAGE, output_dir=output_dir, is_done=is_done,
        skip_errors=cfg.skip_errors, shard=cfg.shard,
    )
