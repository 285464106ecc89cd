"""Restricted unpickler for published pickles (CIFAR-100, revisited Oxford/Paris ground
truth, the SSR authors' landmark features). Plain ``pickle.load`` would run any code a
pickle names; this one resolves only an allow-list of globals: builtin containers and
numbers, and what numpy needs to rebuild arrays, dtypes and scalars.
"""

from __future__ import annotations

import os
import pickle
from pathlib import Path
from typing import IO, Any

import numpy as np

from storage.errors import CorruptFileError, UnsafePickleError

# (module, name) pairs a pickle may reference. Containers and numbers mostly use opcodes
# and need no global; these cover protocol 0-2 pickles and numpy objects.
_ALLOWED_BUILTINS = {
    "set",
    "frozenset",
    "complex",
    "bytearray",
    "slice",
    "range",
    "list",
    "dict",
    "tuple",
    "int",
    "float",
    "bool",
    "str",
    "bytes",
}
_NUMPY_GLOBALS = {
    ("multiarray", "_reconstruct"),
    ("multiarray", "scalar"),
    ("numeric", "_frombuffer"),
}
_NUMPY_CORE_MODULES = ("numpy.core", "numpy._core")


def _is_allowed(module: str, name: str) -> bool:
    if module in ("builtins", "__builtin__"):
        return name in _ALLOWED_BUILTINS
    if module == "_codecs" and name == "encode":  # bytes in protocol <= 2 pickles
        return True
    if module == "copy_reg" or module == "copyreg":
        return False
    if module == "numpy" and name in ("ndarray", "dtype"):
        return True
    for core in _NUMPY_CORE_MODULES:
        for sub, fn in _NUMPY_GLOBALS:
            if module == f"{core}.{sub}" and name == fn:
                return True
    return False


class _RestrictedUnpickler(pickle.Unpickler):
    def __init__(self, file, *, source: str, encoding: str) -> None:
        super().__init__(file, encoding=encoding, errors="strict")
        self._source = source

    def find_class(self, module: str, name: str) -> Any:
        if not _is_allowed(module, name):
            raise UnsafePickleError(
                f"{self._source}: pickle references forbidden global {module}.{name}; "
                "only containers, numbers, strings and numpy arrays are allowed"
            )
        if module == "__builtin__":
            module = "builtins"
        if module.startswith("numpy.core") and int(np.__version__.split(".")[0]) >= 2:
            module = "numpy._core" + module[len("numpy.core") :]
        return super().find_class(module, name)

    def persistent_load(self, pid: Any) -> Any:
        raise UnsafePickleError(f"{self._source}: pickle uses persistent ids, which are not allowed")


_LOAD_ERRORS = (
    pickle.UnpicklingError,
    EOFError,
    ValueError,
    TypeError,
    AttributeError,
    IndexError,
    KeyError,
    UnicodeDecodeError,
    MemoryError,
)


def _load(file: IO[bytes], source: str, encoding: str) -> Any:
    try:
        return _RestrictedUnpickler(file, source=source, encoding=encoding).load()
    except UnsafePickleError:
        raise
    except _LOAD_ERRORS as exc:
        raise CorruptFileError(f"{source}: not a readable pickle ({type(exc).__name__}: {exc})") from exc


def safe_load(path: str | os.PathLike, *, encoding: str = "latin1") -> Any:
    """Load a pickle file with the restricted unpickler.

    ``encoding`` decodes Python 2 ``str`` objects: ``"latin1"`` (default, gives ``str``
    keys and is what numpy needs for py2 arrays) or ``"bytes"`` (keeps them as ``bytes``).
    Use :func:`str_keys` to normalise dict keys either way.
    Raises UnsafePickleError for a forbidden global, CorruptFileError for a damaged file.
    """
    with open(Path(path), "rb") as f:
        return _load(f, os.fspath(path), encoding)


def str_keys(obj: Any) -> Any:
    """Return ``obj`` with every ``bytes`` dict key decoded as latin-1, recursively through
    dicts and lists (pickles written by Python 2 and read with ``encoding="bytes"``)."""
    if isinstance(obj, dict):
        return {(k.decode("latin1") if isinstance(k, bytes) else k): str_keys(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [str_keys(v) for v in obj]
    return obj
