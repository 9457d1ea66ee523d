"""Exceptions raised by slidemil; every message names the slide or file and the fix."""

from __future__ import annotations


class SlidemilError(Exception):
    """Base class of every error slidemil raises on purpose."""

    #: Short machine-readable type written to the manifest's `error_type` column.
    error_type = "error"


class SlideOpenError(SlidemilError):
    """A slide file cannot be opened or is not a supported format."""

    error_type = "unreadable"


class MissingMppError(SlidemilError):
    """A slide's resolution (µm per pixel) is unknown and no override was given."""

    error_type = "no_mpp"


class TileReadError(SlidemilError):
    """Pixels of a region of a slide could not be decoded."""

    error_type = "tile_read"


class IncompleteStoreError(SlidemilError):
    """A store file exists but was never completed (killed job, full disk, copy in progress)."""

    error_type = "incomplete_store"


class StoreFormatError(SlidemilError):
    """A store has missing datasets, wrong shapes, NaN rows or attributes that do not match."""

    error_type = "bad_store"


class DuplicateSlideIdError(SlidemilError):
    """Two input files map to one slide id."""

    error_type = "duplicate_id"


class BackboneError(SlidemilError):
    """A backbone name, weights file or checkpoint does not fit."""

    error_type = "backbone"


class ConfigError(SlidemilError):
    """A configuration value, label file or split file is invalid."""

    error_type = "config"


class CheckpointError(SlidemilError):
    """A model checkpoint is missing, unreadable, or belongs to another model or class map."""

    error_type = "checkpoint"


class StoreWriteError(SlidemilError, OSError):
    """A failed store write (full disk, missing permission); nothing of the store is committed."""

    error_type = "write_failed"
