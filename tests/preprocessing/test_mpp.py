"""The mpp fallback chain."""

from __future__ import annotations

import pytest

from preprocessing.mpp import magnification_from_mpp, resolve_mpp, validate_user_mpp


def test_openslide_property_first() -> None:
    result = resolve_mpp(
        {
            "openslide.mpp-x": "0.2502",
            "tiff.XResolution": "10000",
            "tiff.ResolutionUnit": "centimeter",
        }
    )
    assert result.mpp == pytest.approx(0.2502)
    assert result.source == "openslide.mpp-x"


@pytest.mark.parametrize(
    ("resolution", "unit", "expected"),
    [
        ("40000", "centimeter", 0.25),
        ("40000", "3", 0.25),
        ("50800", "inch", 0.5),
        ("50800", "2", 0.5),
    ],
)
def test_tiff_resolution_units(resolution: str, unit: str, expected: float) -> None:
    result = resolve_mpp({"tiff.XResolution": resolution, "tiff.ResolutionUnit": unit})
    assert result.mpp == pytest.approx(expected)
    assert result.source == "tiff.XResolution"


def test_unitless_resolution_is_ignored() -> None:
    result = resolve_mpp({"tiff.XResolution": "4", "tiff.ResolutionUnit": "1"})
    assert result.mpp is None
    assert result.source is None


def test_screen_dpi_skipped_for_vendor_key() -> None:
    result = resolve_mpp(
        {
            "openslide.mpp-x": "352.77777",
            "tiff.XResolution": "72",
            "tiff.ResolutionUnit": "inch",
            "tiff.ImageDescription": "Aperio Image Library\r\n46000x32914 |MPP = 0.2528",
        }
    )
    assert result.mpp == pytest.approx(0.2528)
    assert result.source == "aperio.MPP"
    assert len(result.rejected) == 2
    assert "outside" in result.rejected[0]


@pytest.mark.parametrize(
    ("properties", "source", "expected"),
    [
        (
            {"philips.DICOM_PIXEL_SPACING": '"0.000243902" "0.000243902"'},
            "philips.DICOM_PIXEL_SPACING",
            0.2439,
        ),
        (
            {"mirax.LAYER_0_LEVEL_0_SECTION.MICROMETER_PER_PIXEL_X": "0.2434"},
            "mirax.MICROMETER_PER_PIXEL_X",
            0.2434,
        ),
        ({"ventana.ScanRes": "0.465"}, "ventana.ScanRes", 0.465),
        (
            {"tiff.ImageDescription": '<Pixels PhysicalSizeX="325" PhysicalSizeXUnit="nm"/>'},
            "ome.PhysicalSizeX",
            0.325,
        ),
    ],
)
def test_vendor_keys(properties: dict[str, str], source: str, expected: float) -> None:
    result = resolve_mpp(properties)
    assert result.source == source
    assert result.mpp == pytest.approx(expected, rel=1e-3)


def test_override_wins_and_default_only_fills_gaps(caplog: pytest.LogCaptureFixture) -> None:
    assert resolve_mpp({"openslide.mpp-x": "0.25"}, override=0.5).mpp == 0.5
    assert resolve_mpp({"openslide.mpp-x": "0.25"}, override=0.5).source == "override"
    assert resolve_mpp({"openslide.mpp-x": "0.25"}, default=0.5).mpp == 0.25
    assert resolve_mpp({}, default=0.5).mpp == 0.5
    assert resolve_mpp({}, default=0.5).source == "override"
    assert "replaces 0.25" in caplog.text


def test_unreadable_value_is_reported_and_skipped() -> None:
    result = resolve_mpp({"openslide.mpp-x": "n/a", "aperio.MPP": "0.5"})
    assert result.mpp == 0.5
    assert "openslide.mpp-x: unreadable" in result.rejected[0]


@pytest.mark.parametrize("bad", [0.0, -0.25, float("nan"), float("inf"), 50.0, 0.005])
def test_invalid_override_rejected(bad: float) -> None:
    with pytest.raises(ValueError, match="outside the plausible range 0.01 to 20"):
        resolve_mpp({}, override=bad)
    with pytest.raises(ValueError, match=f"default mpp {bad!r}"):
        resolve_mpp({}, default=bad)


def test_plausible_user_mpp_accepted() -> None:
    assert validate_user_mpp(0.01, "--mpp") == 0.01
    assert validate_user_mpp(20, "--mpp") == 20.0


def test_magnification_from_mpp() -> None:
    assert magnification_from_mpp(0.25) == pytest.approx(40.0)
    assert magnification_from_mpp(0.5) == pytest.approx(20.0)
