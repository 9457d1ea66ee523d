"""Slide lists: a folder, a glob or a CSV of slides, mapped to slide ids.

A slide id is the file name minus its final known slide extension, so
``TCGA-AA-3512-01Z-00-DX1.<uuid>.svs`` keeps every dot before ``.svs``. Two inputs with one id
raise `DuplicateSlideIdError` before any work starts, because every output is named by id.
"""

from __future__ import annotations

import csv
import glob
import logging
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from preprocessing.errors import ConfigError, DuplicateSlideIdError
from preprocessing.mpp import validate_user_mpp

logger = logging.getLogger(__name__)

#: File extensions (lower case) that a folder or glob listing treats as slides.
SLIDE_EXTENSIONS: frozenset[str] = frozenset(
    {
        ".svs",  # Aperio
        ".tif",
        ".tiff",  # generic tiled TIFF, Philips TIFF, Ventana, plain TIFF
        ".ndpi",  # Hamamatsu
        ".vms",
        ".vmu",  # Hamamatsu (older)
        ".scn",  # Leica
        ".mrxs",  # 3DHISTECH MIRAX
        ".svslide",  # Sakura
        ".bif",  # Ventana
        ".dcm",  # DICOM WSI
        ".qptiff",  # Akoya / PerkinElmer
    }
)

#: CSV column names accepted for the slide path, first match wins.
PATH_COLUMNS = ("path", "slide_path", "filename")


@dataclass(frozen=True)
class SlideInput:
    """One slide to process.

    Attributes:
        slide_id: name of every output of this slide.
        path: slide file (absolute once listed).
        mpp: per-slide override of the level-0 µm per pixel from a CSV column, or None.
    """

    slide_id: str
    path: Path
    mpp: float | None = None


def slide_id_from_path(path: str | Path) -> str:
    """Return the slide id of `path`: the file name minus its final known slide extension.

    A name whose final suffix is not a known slide extension is returned whole.
    """
    name = Path(path).name
    suffix = Path(name).suffix
    if suffix.lower() in SLIDE_EXTENSIONS:
        return name[: -len(suffix)]
    return name


def list_slides(spec: str | Path, *, recursive: bool = False) -> list[SlideInput]:
    """List the slides named by `spec`, sorted by slide id.

    Args:
        spec: a folder (its files with a known slide extension), a glob pattern (``**`` allowed)
            or a CSV file with a ``path`` column and optional ``slide_id`` and ``mpp`` columns.
            Relative CSV paths are resolved against the CSV's folder.
        recursive: also list slides in sub-folders of a folder `spec`. Off by default because
            MIRAX slides keep their data files in a folder next to the ``.mrxs`` file.

    Raises:
        ConfigError: `spec` matches nothing or the CSV is malformed.
        DuplicateSlideIdError: two inputs map to one slide id.
    """
    text = str(spec)
    path = Path(text).expanduser()
    if path.is_dir():
        pattern = "**/*" if recursive else "*"
        slides = [_input_for(p) for p in sorted(path.glob(pattern)) if _is_slide_file(p)]
        where = f"folder {path}"
    elif path.is_file() and path.suffix.lower() == ".csv":
        slides = _read_slide_csv(path)
        where = f"CSV {path}"
    elif path.is_file():
        slides = [_input_for(path)]
        where = f"file {path}"
    elif glob.has_magic(text):
        matches = sorted(Path(p) for p in glob.glob(str(path), recursive=True))
        skipped = [p for p in matches if p.is_file() and not _is_slide_file(p)]
        if skipped:
            logger.info("Glob %s: ignored %d files without a slide extension", text, len(skipped))
        slides = [_input_for(p) for p in matches if _is_slide_file(p)]
        where = f"glob {text}"
    else:
        raise ConfigError(
            f"Slide input {text!r} is neither a folder, a file, a CSV nor a glob pattern that "
            "exists. Pass a folder of slides, a pattern such as 'slides/*.svs' or a CSV with a "
            "'path' column."
        )

    if not slides:
        raise ConfigError(
            f"No slides found in {where}. Known slide extensions: "
            f"{', '.join(sorted(SLIDE_EXTENSIONS))}."
        )
    check_unique_ids(slides)
    return sorted(slides, key=lambda s: s.slide_id)


def check_unique_ids(slides: Iterable[SlideInput]) -> None:
    """Raise `DuplicateSlideIdError` listing every slide id that two or more inputs share."""
    by_id: dict[str, list[Path]] = defaultdict(list)
    for slide in slides:
        by_id[slide.slide_id].append(slide.path)
    duplicates = {sid: paths for sid, paths in by_id.items() if len(paths) > 1}
    if duplicates:
        lines = "; ".join(
            f"{sid!r}: {', '.join(str(p) for p in paths)}"
            for sid, paths in sorted(duplicates.items())
        )
        raise DuplicateSlideIdError(
            f"{len(duplicates)} slide ids are shared by several input files ({lines}). Outputs are "
            "named by slide id, so rename the files or list them in a CSV with a unique "
            "'slide_id' column."
        )


def read_mpp_csv(path: Path) -> dict[str, float]:
    """Read a per-slide mpp override table with columns ``slide_id,mpp``.

    Raises:
        ConfigError: missing columns, a non-numeric or implausible mpp (outside
            `PLAUSIBLE_MPP_RANGE`), or a repeated slide id.
    """
    overrides: dict[str, float] = {}
    rows = _read_csv_rows(path, required=("slide_id", "mpp"))
    for line, row in rows:
        slide_id = (row.get("slide_id") or "").strip()
        mpp = _parse_mpp_cell(row.get("mpp") or "", f"{path}, line {line}, slide {slide_id!r}")
        if slide_id in overrides:
            raise ConfigError(
                f"{path}, line {line}: slide {slide_id!r} is listed twice. Keep one row per slide."
            )
        if not slide_id:
            raise ConfigError(f"{path}, line {line}: empty slide_id. Give every row a slide id.")
        overrides[slide_id] = mpp
    return overrides


def _parse_mpp_cell(cell: str, where: str) -> float:
    """Parse one CSV mpp cell; `where` names the file, line and slide for the message.

    Raises:
        ConfigError: the cell is not a number or lies outside the plausible mpp range.
    """
    text = cell.strip()
    try:
        value = float(text)
    except ValueError as err:
        raise ConfigError(
            f"{where}: invalid mpp {text!r}. Write µm per level-0 pixel as a number, e.g. 0.25."
        ) from err
    try:
        return validate_user_mpp(value, "mpp")
    except ValueError as err:
        raise ConfigError(f"{where}: {err} Correct this row of the CSV.") from err


# NOTE: a DICOM slide is a folder of .dcm instances (one per level), and a folder or glob
# listing makes each instance its own slide. List one file per DICOM slide in a CSV instead.
def _is_slide_file(path: Path) -> bool:
    return path.is_file() and path.suffix.lower() in SLIDE_EXTENSIONS


def _input_for(path: Path, slide_id: str | None = None, mpp: float | None = None) -> SlideInput:
    return SlideInput(slide_id or slide_id_from_path(path), path.resolve(), mpp)


def _read_slide_csv(path: Path) -> list[SlideInput]:
    rows = _read_csv_rows(path, required=())
    if not rows:
        return []
    columns = rows[0][1].keys()
    path_column = next((c for c in PATH_COLUMNS if c in columns), None)
    if path_column is None:
        raise ConfigError(
            f"{path}: no slide path column; the header must contain one of {PATH_COLUMNS}."
        )
    slides = []
    for line, row in rows:
        raw_path = (row.get(path_column) or "").strip()
        if not raw_path:
            raise ConfigError(f"{path}, line {line}: empty {path_column!r}. Give every row a path.")
        slide_path = Path(raw_path).expanduser()
        if not slide_path.is_absolute():
            slide_path = path.parent / slide_path
        mpp = None
        if (row.get("mpp") or "").strip():
            mpp = _parse_mpp_cell(row["mpp"], f"{path}, line {line}")
        slide_id = (row.get("slide_id") or "").strip() or None
        if slide_id is not None and (
            "/" in slide_id or "\\" in slide_id or slide_id.startswith(".")
        ):
            raise ConfigError(
                f"{path}, line {line}: invalid slide_id {slide_id!r}. Outputs are files named by "
                "slide id, so it must not contain '/' or '\\' or start with '.'."
            )
        slides.append(_input_for(slide_path, slide_id, mpp))
    return slides


def _read_csv_rows(path: Path, required: tuple[str, ...]) -> list[tuple[int, dict[str, str]]]:
    """Rows of a CSV with their line numbers; header names are stripped and lower-cased."""
    try:
        with path.open(newline="", encoding="utf-8-sig") as handle:
            reader = csv.DictReader(handle)
            if reader.fieldnames is None:
                raise ConfigError(f"{path}: the CSV is empty; it needs a header row.")
            reader.fieldnames = [name.strip().lower() for name in reader.fieldnames]
            missing = [column for column in required if column not in reader.fieldnames]
            if missing:
                raise ConfigError(
                    f"{path}: missing columns {missing}; the header has {reader.fieldnames}."
                )
            return [(reader.line_num, dict(row)) for row in reader]
    except OSError as err:
        raise ConfigError(f"{path}: cannot read the CSV ({err}).") from err
    except (csv.Error, UnicodeDecodeError) as err:
        raise ConfigError(f"{path}: not a valid UTF-8 CSV file ({err}).") from err
