"""Error types raised by the storage package.

Every error is a ``ValueError`` subclass whose message names the file, the field and
what was expected, e.g. ``features.parquet: embedding has dim 512, expected 640``.
"""

from __future__ import annotations


class StorageError(ValueError):
    """Base class: bad input found while reading or writing project data."""


class SchemaError(StorageError):
    """A table lacks a column, has an extra one, or a column has the wrong type/shape."""


class CorruptFileError(StorageError):
    """A file is truncated, not in the expected format, or fails its checksum."""


class DataValueError(StorageError):
    """Values are out of range: NaN/inf, duplicate ids, ids past the database, ..."""


class DatasetLayoutError(StorageError):
    """A few-shot folder tree or episode file does not match the expected layout."""


class ManifestError(StorageError):
    """A similarity-store manifest is missing, malformed or disagrees with its shards."""


class UnsafePickleError(StorageError):
    """A pickle references a global outside the allow-list of the restricted unpickler."""


class ChecksumError(CorruptFileError):
    """A downloaded or stored file does not have the expected SHA-256."""


class DownloadError(StorageError):
    """A download failed (HTTP error, unknown source name, bad archive)."""
