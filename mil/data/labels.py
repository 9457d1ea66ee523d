"""Slide labels: read a label CSV, join it with the feature stores, map label values to classes.

A label CSV has one row per slide with the columns `slide_id` and `label`, and optionally
`case_id` (the patient), `split` (train/val/test) and any number of extra target columns.
`join_labels` matches it against the slides that have feature stores and returns a `JoinReport`
listing every mismatch. `ClassMap` turns label values into class indices. It is saved once per
run as `classes.json`, so training, prediction and heatmaps agree on the order of the classes.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import math
import os
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from preprocessing.errors import ConfigError
from preprocessing.inputs import SLIDE_EXTENSIONS

logger = logging.getLogger(__name__)

#: File extensions that a slide id written in a label CSV may carry by mistake: the slide
#: formats slidemil reads and the feature file suffixes. The slide id of a file is its name
#: without one final extension of this list (`a.b.svs` has the id `a.b`).
SLIDE_ID_EXTENSIONS: tuple[str, ...] = (
    *sorted(SLIDE_EXTENSIONS), ".czi", ".isyntax", ".h5", ".hdf5", ".zarr", ".pt",
)

#: Cell values read as a missing label.
BLANK_VALUES = frozenset({"", "na", "n/a", "nan", "none", "null", "-"})

#: Accepted spellings of the column names, lower-case; the first of each tuple is canonical.
COLUMN_ALIASES: dict[str, tuple[str, ...]] = {
    "slide_id": ("slide_id", "slide", "slide_name", "filename"),
    "label": ("label", "target", "class"),
    "case_id": ("case_id", "patient_id", "patient", "case"),
    "split": ("split", "set", "subset"),
}


def normalize_label(value: object) -> str | None:
    """Return the canonical text of a label value, or None when the value is blank.

    Numbers are compared by value, so `0`, `0.0`, `"0"`, `" 0 "` and `"0.00"` all become `"0"`,
    and `"1e1"` becomes `"10"`. Text other than numbers is stripped of surrounding white space
    and kept with its case (`"Tumor"` and `"tumor"` are two classes).
    """
    if value is None:
        return None
    if isinstance(value, bool):
        return str(int(value))
    if isinstance(value, int | float):
        number = float(value)
        if math.isnan(number):
            return None
        return _format_number(number)
    text = str(value).strip()
    if text.lower() in BLANK_VALUES:
        return None
    try:
        # Integers are parsed exactly, so long numeric labels do not lose digits as floats.
        return str(int(text))
    except ValueError:
        pass
    try:
        number = float(text)
    except ValueError:
        return text
    if math.isnan(number) or math.isinf(number):
        return text
    return _format_number(number)


def _format_number(number: float) -> str:
    if number.is_integer():
        return str(int(number))
    return repr(number)


def strip_slide_extension(slide_id: str) -> str:
    """Return `slide_id` without one final known slide or store extension, if it has one."""
    lowered = slide_id.lower()
    for extension in SLIDE_ID_EXTENSIONS:
        if lowered.endswith(extension) and len(slide_id) > len(extension):
            return slide_id[: -len(extension)]
    return slide_id


@dataclass(frozen=True)
class LabelRow:
    """One row of a label CSV.

    Attributes:
        slide_id: slide id as written in the CSV, stripped of surrounding white space.
        label: normalised label value (see `normalize_label`), or None when the cell is blank.
        case_id: patient id; the slide id when the CSV has no `case_id` column or the cell is blank.
        split: `train`, `val` or `test` when the CSV has a `split` column, else None.
        extras: the other columns of the row, keyed by their header.
        line: line number in the CSV (the header is line 1).
    """

    slide_id: str
    label: str | None
    case_id: str
    split: str | None = None
    extras: Mapping[str, str] = field(default_factory=dict)
    line: int = 0


@dataclass
class LabelTable:
    """The rows of a label CSV in file order, duplicates and blank labels included.

    Attributes:
        rows: every data row of the file.
        path: the CSV the rows came from (None for a table built in code).
        has_case_ids: whether the file has a `case_id` column.
        has_splits: whether the file has a `split` column.
        extra_columns: headers of the columns other than slide id, label, case id and split.
    """

    rows: list[LabelRow]
    path: Path | None = None
    has_case_ids: bool = False
    has_splits: bool = False
    extra_columns: tuple[str, ...] = ()

    def __len__(self) -> int:
        return len(self.rows)

    @classmethod
    def from_mapping(cls, labels: Mapping[str, object]) -> LabelTable:
        """Build a table from `{slide_id: label}`, each slide its own case."""
        rows = [
            LabelRow(slide_id=str(slide_id), label=normalize_label(label), case_id=str(slide_id),
                     line=index + 2)
            for index, (slide_id, label) in enumerate(labels.items())
        ]
        return cls(rows=rows)


SPLIT_NAMES: dict[str, str] = {
    "train": "train", "training": "train",
    "val": "val", "valid": "val", "validation": "val", "tune": "val",
    "test": "test", "testing": "test", "holdout": "test", "held-out": "test",
}


def normalize_split(value: str, path: Path | None = None, line: int = 0) -> str | None:
    """Map a split cell to `train`, `val` or `test`; blank cells give None.

    Raises:
        ConfigError: the cell contains any other value.
    """
    text = value.strip().lower()
    if text in BLANK_VALUES:
        return None
    if text not in SPLIT_NAMES:
        where = f"{path}, line {line}" if path is not None else f"line {line}"
        raise ConfigError(
            f"{where}: split value {value!r} is invalid; use train, val or test "
            "(or leave the cell blank to exclude the slide from every split)"
        )
    return SPLIT_NAMES[text]


def read_labels(
    path: str | os.PathLike[str],
    slide_column: str | None = None,
    label_column: str | None = None,
) -> LabelTable:
    """Read a label CSV (comma, semicolon or tab separated, optional UTF-8 byte order mark).

    Args:
        path: the CSV file.
        slide_column: header of the slide id column; by default the first of `slide_id`,
            `slide`, `slide_name`, `filename` present (case-insensitive).
        label_column: header of the label column; by default `label`, `target` or `class`.

    Returns:
        The rows in file order. Nothing is dropped here; `join_labels` reports the problems.

    Raises:
        ConfigError: the file is missing, empty, or lacks a slide id or label column.
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8-sig")
    except FileNotFoundError as err:
        raise ConfigError(f"label file {path} not found; pass the path of a CSV with the "
                          "columns slide_id and label") from err
    except UnicodeDecodeError as err:
        raise ConfigError(f"label file {path} is not UTF-8 text; save it as UTF-8 CSV") from err
    lines = text.splitlines()
    if not lines or not lines[0].strip():
        raise ConfigError(f"label file {path} is empty; it needs a header line with the "
                          "columns slide_id and label")

    try:
        dialect: type[csv.Dialect] | csv.Dialect = csv.Sniffer().sniff(lines[0], delimiters=",;\t")
    except csv.Error:
        dialect = csv.excel
    reader = csv.reader(io.StringIO(text, newline=""), dialect)
    header = [cell.strip() for cell in next(reader)]

    slide_index = _find_column(header, slide_column, "slide_id", path)
    label_index = _find_column(header, label_column, "label", path)
    case_index = _find_optional_column(header, "case_id")
    split_index = _find_optional_column(header, "split")
    used = {slide_index, label_index, case_index, split_index}
    extra_indices = [i for i in range(len(header)) if i not in used]

    rows: list[LabelRow] = []
    for cells in reader:
        # The line where the row ends; a quoted cell may span several lines.
        line_number = reader.line_num
        if not any(cell.strip() for cell in cells):
            continue
        cells = cells + [""] * (len(header) - len(cells))
        slide_id = cells[slide_index].strip()
        if not slide_id:
            logger.warning("%s, line %d: no slide id; the row is ignored", path, line_number)
            continue
        case_id = cells[case_index].strip() if case_index is not None else ""
        split = (normalize_split(cells[split_index], path, line_number)
                 if split_index is not None else None)
        rows.append(LabelRow(
            slide_id=slide_id,
            label=normalize_label(cells[label_index]),
            case_id=case_id or slide_id,
            split=split,
            extras={header[i]: cells[i].strip() for i in extra_indices},
            line=line_number,
        ))
    logger.info("read %d label rows from %s", len(rows), path)
    warn_case_variants(rows, path)
    return LabelTable(
        rows=rows,
        path=path,
        has_case_ids=case_index is not None,
        has_splits=split_index is not None,
        extra_columns=tuple(header[i] for i in extra_indices),
    )


def warn_case_variants(rows: Sequence[LabelRow], path: Path | None = None) -> list[list[str]]:
    """Warn about labels that differ only in letter case, since they become separate classes.

    Returns:
        The groups of spellings that were warned about, each sorted.
    """
    counts = Counter(row.label for row in rows if row.label is not None)
    spellings: dict[str, list[str]] = {}
    for label in sorted(counts):
        spellings.setdefault(label.casefold(), []).append(label)
    groups = [group for group in spellings.values() if len(group) > 1]
    for group in groups:
        shown = ", ".join(f"{label!r} ({counts[label]} row{'s' if counts[label] != 1 else ''})"
                          for label in group)
        logger.warning("label file %s: the labels %s differ only in letter case and become "
                       "separate classes; write them the same way if they are one class",
                       path or "", shown)
    return groups


def _find_column(header: list[str], requested: str | None, role: str, path: Path) -> int:
    if requested is not None:
        if requested not in header:
            raise ConfigError(f"label file {path} has no column {requested!r}; "
                              f"its columns are {header}. Pass one of them with "
                              f"--{role.split('_')[0]}-column")
        return header.index(requested)
    index = _find_optional_column(header, role)
    if index is None:
        names = ", ".join(COLUMN_ALIASES[role])
        raise ConfigError(f"label file {path} has no {role} column (looked for {names}); "
                          f"its columns are {header}. Rename the column, or pass its name "
                          f"with --{role.split('_')[0]}-column ({role.split('_')[0]}_column in "
                          "a config file)")
    return index


def _find_optional_column(header: list[str], role: str) -> int | None:
    lowered = [name.lower() for name in header]
    for alias in COLUMN_ALIASES[role]:
        if alias in lowered:
            return lowered.index(alias)
    return None


@dataclass
class JoinReport:
    """Result of matching a label table against the slides that have feature stores.

    Attributes:
        matched: one row per usable slide, sorted by slide id; `slide_id` is the feature store's id.
        missing_features: labelled slide ids that have no feature store.
        unlabeled_features: feature store ids that no CSV row names.
        blank_labels: slide ids whose label cell is blank.
        conflicting_duplicates: slide id → the different labels (or case ids) its rows give.
        duplicate_rows: slide ids listed more than once with the same label (kept once).
        extension_ids: id as written in the CSV → feature store id, for ids written with a file
            extension; these rows are matched, not excluded.
    """

    matched: list[LabelRow]
    missing_features: list[str] = field(default_factory=list)
    unlabeled_features: list[str] = field(default_factory=list)
    blank_labels: list[str] = field(default_factory=list)
    conflicting_duplicates: dict[str, list[str]] = field(default_factory=dict)
    duplicate_rows: list[str] = field(default_factory=list)
    extension_ids: dict[str, str] = field(default_factory=dict)

    @property
    def slide_ids(self) -> list[str]:
        return [row.slide_id for row in self.matched]

    @property
    def labels(self) -> dict[str, str]:
        """Slide id → normalised label of every matched slide."""
        return {row.slide_id: row.label for row in self.matched if row.label is not None}

    @property
    def case_ids(self) -> dict[str, str]:
        return {row.slide_id: row.case_id for row in self.matched}

    def extra(self, column: str) -> dict[str, str]:
        """Slide id → the cell of an extra target column, for every matched slide.

        Raises:
            ConfigError: no matched row has the column.
        """
        values = {row.slide_id: row.extras[column] for row in self.matched
                  if column in row.extras}
        if not values:
            columns = sorted({name for row in self.matched for name in row.extras})
            raise ConfigError(f"the label file has no column {column!r}; its extra columns "
                              f"are {columns}")
        return values

    @property
    def n_excluded(self) -> int:
        """Labelled slides left out: no features, blank label or conflicting rows."""
        return (len(self.missing_features) + len(self.blank_labels)
                + len(self.conflicting_duplicates))

    @property
    def is_clean(self) -> bool:
        """True when every CSV row and every feature store matched one to one."""
        return not (self.n_excluded or self.unlabeled_features or self.duplicate_rows
                    or self.extension_ids)

    def summary(self, max_ids: int = 5) -> str:
        """Multi-line text for logs and the run directory, listing up to `max_ids` ids per fault."""
        lines = [f"matched: {len(self.matched)} slides"]
        faults: list[tuple[str, Sequence[str]]] = [
            ("labelled slides without features (excluded)", self.missing_features),
            ("blank labels (excluded)", self.blank_labels),
            ("conflicting duplicate rows (excluded)",
             [f"{slide} {values}" for slide, values in self.conflicting_duplicates.items()]),
            ("features without a label (not used)", self.unlabeled_features),
            ("identical duplicate rows (kept once)", self.duplicate_rows),
            ("ids written with a file extension (matched without it)",
             [f"{written} -> {resolved}" for written, resolved in self.extension_ids.items()]),
        ]
        for title, ids in faults:
            if not ids:
                continue
            listed = ", ".join(ids[:max_ids])
            more = f", ... ({len(ids) - max_ids} more)" if len(ids) > max_ids else ""
            lines.append(f"{title}: {len(ids)}: {listed}{more}")
        return "\n".join(lines)

    def to_dict(self) -> dict[str, object]:
        """JSON-serialisable form, for saving next to a run."""
        return {
            "matched": self.slide_ids,
            "missing_features": self.missing_features,
            "unlabeled_features": self.unlabeled_features,
            "blank_labels": self.blank_labels,
            "conflicting_duplicates": self.conflicting_duplicates,
            "duplicate_rows": self.duplicate_rows,
            "extension_ids": self.extension_ids,
        }


def join_labels(
    table: LabelTable,
    feature_dir_or_ids: str | os.PathLike[str] | Iterable[str],
    strict: bool = False,
) -> JoinReport:
    """Match label rows with the slides that have feature stores.

    Args:
        table: rows from `read_labels`.
        feature_dir_or_ids: a folder of feature stores (`<slide_id>.h5` or `.zarr`, or the
            imported CLAM/TRIDENT/STAMP layouts), or the slide ids that have features.
        strict: raise instead of excluding slides with missing features, blank labels or
            conflicting duplicate rows, and on feature stores without a label.

    Returns:
        The report; `report.matched` are the slides to use. Its summary is logged as a warning
        when anything was excluded.

    Raises:
        ConfigError: under `strict`, when anything was excluded or left unlabelled; always, when
            no slide matched.
    """
    feature_ids = _feature_ids(feature_dir_or_ids)
    source = str(table.path) if table.path is not None else "the label table"

    by_id: dict[str, list[LabelRow]] = {}
    extension_ids: dict[str, str] = {}
    for row in table.rows:
        slide_id = row.slide_id
        if slide_id not in feature_ids:
            stripped = strip_slide_extension(slide_id)
            if stripped != slide_id and stripped in feature_ids:
                extension_ids[slide_id] = stripped
                slide_id = stripped
        by_id.setdefault(slide_id, []).append(row)

    report = JoinReport(matched=[], extension_ids=extension_ids)
    for slide_id in sorted(by_id):
        rows = by_id[slide_id]
        distinct_labels = sorted({str(row.label) for row in rows if row.label is not None})
        distinct_cases = sorted({row.case_id for row in rows})
        if len(distinct_labels) > 1:
            report.conflicting_duplicates[slide_id] = distinct_labels
            continue
        if len(distinct_cases) > 1:
            report.conflicting_duplicates[slide_id] = [f"case_id={c}" for c in distinct_cases]
            continue
        if len(rows) > 1:
            report.duplicate_rows.append(slide_id)
        if not distinct_labels:
            report.blank_labels.append(slide_id)
            continue
        if slide_id not in feature_ids:
            report.missing_features.append(slide_id)
            continue
        labelled = next(row for row in rows if row.label is not None)
        report.matched.append(LabelRow(
            slide_id=slide_id,
            label=labelled.label,
            case_id=labelled.case_id if labelled.case_id != labelled.slide_id else slide_id,
            split=labelled.split,
            extras=labelled.extras,
            line=labelled.line,
        ))
    report.unlabeled_features = sorted(feature_ids - set(by_id))

    if not report.is_clean:
        message = f"joining labels from {source} with the feature stores:\n{report.summary()}"
        if strict and (report.n_excluded or report.unlabeled_features):
            raise ConfigError(message + "\nFix the label file or the feature folder, "
                                        "or run without strict mode to exclude these slides")
        if report.n_excluded or report.unlabeled_features:
            logger.warning(message)
        else:
            logger.info(message)
    if not report.matched:
        raise ConfigError(
            f"no slide of {source} has both a label and a feature store "
            f"({len(table.rows)} label rows, {len(feature_ids)} feature stores); check that the "
            "slide_id column holds the feature file names without extension"
        )
    return report


def _feature_ids(feature_dir_or_ids: str | os.PathLike[str] | Iterable[str]) -> set[str]:
    if isinstance(feature_dir_or_ids, str | os.PathLike):
        from mil.data.dataset import find_feature_stores

        return set(find_feature_stores(feature_dir_or_ids))
    return {str(slide_id) for slide_id in feature_dir_or_ids}


class ClassMap:
    """Label value → class index, in a fixed order that the row order of a CSV never changes.

    Classes are sorted numerically when every label is a number (so `2` comes before `10`),
    otherwise as text, unless an explicit order is given (for ordinal grades such as
    low < intermediate < high).
    """

    def __init__(self, names: Sequence[object]) -> None:
        normalized = [normalize_label(name) for name in names]
        if any(name is None for name in normalized):
            raise ConfigError(f"class names {list(names)} contain a blank value")
        names_text = [str(name) for name in normalized]
        if len(set(names_text)) != len(names_text):
            raise ConfigError(f"class names {names_text} repeat a value after normalisation "
                              "(0, 0.0 and '0' are one class)")
        if not names_text:
            raise ConfigError("a class map needs at least one class")
        self._names = tuple(names_text)
        self._index = {name: i for i, name in enumerate(self._names)}

    @classmethod
    def from_labels(
        cls, labels: Iterable[object], order: Sequence[object] | None = None
    ) -> ClassMap:
        """Build the map from every label value seen (blank values are ignored).

        Args:
            labels: label values, in any order and with repeats.
            order: explicit class order; every label seen must be in it.
        """
        seen: set[str] = {
            name for name in (normalize_label(value) for value in labels) if name is not None
        }
        if order is not None:
            class_map = cls(order)
            unknown = sorted(seen - set(class_map.names))
            if unknown:
                raise ConfigError(f"labels {unknown} are not in the class order "
                                  f"{list(class_map.names)}; add them to the order")
            return class_map
        names: list[str] = sorted(seen, key=_class_sort_key)
        return cls(names)

    @property
    def names(self) -> tuple[str, ...]:
        """Class names in index order."""
        return self._names

    @property
    def n_classes(self) -> int:
        return len(self._names)

    def __len__(self) -> int:
        return len(self._names)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, ClassMap) and other.names == self.names

    def __hash__(self) -> int:
        return hash(self._names)

    def __repr__(self) -> str:
        return f"ClassMap({list(self._names)})"

    def index(self, label: object) -> int:
        """Class index of a label value (normalised first, so 1, 1.0 and "1" agree).

        Raises:
            ConfigError: the label is blank or not one of the classes.
        """
        name = normalize_label(label)
        if name is None or name not in self._index:
            raise ConfigError(f"label {label!r} is not one of the classes {list(self._names)} "
                              "of this run's classes.json; relabel the slide or retrain")
        return self._index[name]

    def indices(self, labels: Iterable[object]) -> list[int]:
        return [self.index(label) for label in labels]

    def name(self, index: int) -> str:
        """Class name of an index."""
        return self._names[index]

    def to_dict(self) -> dict[str, int]:
        """Label → index, the content of classes.json."""
        return dict(self._index)

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write classes.json: a JSON object label → index, in index order."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
        tmp.write_text(json.dumps(self.to_dict(), indent=2) + "\n", encoding="utf-8")
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> ClassMap:
        """Read classes.json (an object label → index, or a list of names in index order).

        Raises:
            ConfigError: the file is missing, not JSON, or its indices are not 0..C-1.
        """
        path = Path(path)
        try:
            content = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError as err:
            raise ConfigError(f"class map {path} not found; it is written by training into "
                              "the run directory") from err
        except json.JSONDecodeError as err:
            raise ConfigError(f"class map {path} is not valid JSON: {err}") from err
        names: list[object]
        if isinstance(content, list):
            names = content
        elif isinstance(content, dict) and "classes" in content and isinstance(
                content["classes"], list):
            names = content["classes"]
        elif not isinstance(content, dict):
            raise ConfigError(f"class map {path} must be a JSON object label -> index")
        else:
            try:
                by_index = sorted((int(index), name) for name, index in content.items())
            except (TypeError, ValueError) as err:
                raise ConfigError(
                    f"class map {path} has a non-integer index: {content}") from err
            if [index for index, _ in by_index] != list(range(len(by_index))):
                raise ConfigError(f"class map {path} indices must be 0..{len(by_index) - 1} "
                                  f"once each, got {content}")
            names = [name for _, name in by_index]
        if not names:
            raise ConfigError(f"class map {path} lists no classes; restore the classes.json "
                              "that training wrote or train the run again")
        try:
            return cls(names)
        except ConfigError as err:
            raise ConfigError(f"class map {path}: {err}") from err


def _class_sort_key(name: str) -> tuple[int, float, str]:
    try:
        return (0, float(name), name)
    except ValueError:
        return (1, 0.0, name)
