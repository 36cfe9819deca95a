"""Loading user-supplied files without running code from them.

Every file a user can point smaf at is read here, and none is unpickled with arbitrary globals:

* ``.pth`` / ``.pt`` (our checkpoints, ``model.pretrained`` files in the layouts in circulation,
  ``prototypes.pt``): :func:`torch_load` = ``torch.load(weights_only=True)`` with an allow-list of exactly the
  numpy globals our training checkpoints hold (the numpy RNG state is a tuple with a ``uint32`` array):
  ``numpy.core.multiarray._reconstruct`` (and ``numpy._core``'s, as numpy 2 writes it), ``numpy.ndarray``,
  ``numpy.dtype`` and the numeric dtype classes, ``numpy.core.multiarray.scalar`` (numpy scalars such as a
  ``best_acc`` float64 in third-party checkpoints). Nothing else: no custom class, no function.
* ``.npy`` (CAM dicts ``{class: HxW float32}``, ``cls_labels.npy`` ``{id: float32[C]}``): :func:`load_npy`, a
  restricted unpickler that admits only plain containers (dict, list, tuple, ``collections.OrderedDict``),
  strings, numbers, numpy arrays, dtypes and scalars, i.e. what ``np.save(allow_pickle=True)`` writes for such
  dicts (numpy 1.x and 2.x), so the files of PSA, EPS, SMAF and other tools stay readable.

A file that needs more is refused with one line (:class:`UnsafeFileError`) naming the global it asked for and
how to convert it. The one way to read such a file is an explicit, offline conversion of a file the user
trusts, which writes a copy that loads safely::

    python -m smaf.safe_load --trust-pickle IN.pth OUT.pth     # or IN.npy OUT.npy

No stage has a switch that unpickles with arbitrary globals.
"""
from __future__ import annotations

import argparse
import collections
import io
import os
import pickle
import re
import sys
from pathlib import Path
from typing import Any

import numpy as np

from .runtime import EXIT_EXPECTED_ERROR, SmafError, one_line

CONVERT_COMMAND = "python -m smaf.safe_load --trust-pickle"


class SafeLoadError(SmafError, ValueError):
    """A user-supplied file could not be loaded safely; the message names the file and the fix."""


class UnsafeFileError(SafeLoadError):
    """The file needs globals outside the allow-list to be unpickled (it could run code): refused."""


class UnreadableFileError(SafeLoadError):
    """The file is truncated, corrupt or not in the expected format."""


def _convert_hint(path: Path) -> str:
    out = path.with_name(f"{path.stem}_safe{path.suffix}")
    return (f"if you trust the file, convert it once with `{CONVERT_COMMAND} {path} {out}` "
            f"and use the converted copy")


def unsafe_error(path: str | os.PathLike, what: str, name: str) -> UnsafeFileError:
    path = Path(path)
    return UnsafeFileError(
        f"refused to load {what} '{path}': unpickling it needs '{name}', which is not a tensor, array or plain "
        f"container and could run code; smaf loads only tensors, numpy arrays and plain containers; "
        f"{_convert_hint(path)}")


# ---------------------------------------------------------------------------------------------- numpy
def _multiarray():
    try:
        from numpy._core import multiarray  # numpy >= 2
    except ImportError:  # pragma: no cover - numpy 1.x
        from numpy.core import multiarray
    return multiarray


_MULTIARRAY = _multiarray()
_MULTIARRAY_MODULES = ("numpy.core.multiarray", "numpy._core.multiarray")
_NUMERIC_KINDS = "biufc"  # bool, signed and unsigned ints, floats, complex


def _numeric_dtype_classes() -> list[type]:
    classes = []
    for char in np.typecodes["All"]:
        try:
            dtype = np.dtype(char)
        except TypeError:  # pragma: no cover - platform-specific codes
            continue
        if dtype.kind in _NUMERIC_KINDS and type(dtype) not in classes:
            classes.append(type(dtype))
    return classes


def torch_safe_globals() -> list:
    """What :func:`torch_load` adds to torch's weights-only allow-list: numpy's array reconstruction, the
    ndarray and dtype classes, the numeric dtype classes (a dtype is rebuilt as an instance of one) and numpy
    scalars, under numpy 1.x and 2.x names."""
    out: list = [np.ndarray, np.dtype, *_numeric_dtype_classes()]
    for module in _MULTIARRAY_MODULES:
        out.append((_MULTIARRAY._reconstruct, f"{module}._reconstruct"))
        out.append((_MULTIARRAY.scalar, f"{module}.scalar"))
    return out


class _ArrayClassToken:
    """Stands for ``numpy.ndarray`` in a restricted ``.npy`` pickle: usable as ``_reconstruct``'s class
    argument, not callable (so the pickle cannot allocate arbitrary arrays with it)."""


_NDARRAY = _ArrayClassToken()


def _reconstruct(subtype, shape, dtype):
    if subtype is not _NDARRAY:
        raise pickle.UnpicklingError("_reconstruct of a class other than numpy.ndarray")
    if int(np.prod(shape)) > 1:
        raise pickle.UnpicklingError("_reconstruct with a non-empty shape")
    return _MULTIARRAY._reconstruct(np.ndarray, shape, dtype)


def _scalar(dtype, *args):
    if not isinstance(dtype, np.dtype):
        raise pickle.UnpicklingError("numpy scalar without a dtype")
    return _MULTIARRAY.scalar(dtype, *args)


def _dtype(*args):
    return np.dtype(*args)


def _latin1_bytes(text, encoding="latin1"):
    """How pickle protocol 2 stores bytes: ``_codecs.encode(str, 'latin1')`` (only that codec)."""
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
        raise pickle.UnpicklingError("_codecs.encode is allowed only for latin1 bytes")
    return text.encode("latin1")


_NPY_GLOBALS = {**{(m, "_reconstruct"): _reconstruct for m in _MULTIARRAY_MODULES},
                **{(m, "scalar"): _scalar for m in _MULTIARRAY_MODULES},
                ("numpy", "ndarray"): _NDARRAY, ("numpy", "dtype"): _dtype, ("_codecs", "encode"): _latin1_bytes,
                ("collections", "OrderedDict"): collections.OrderedDict}


class RestrictedUnpickler(pickle.Unpickler):
    """Unpickles dicts, lists, tuples, strings, bytes, numbers, numpy arrays, dtypes and scalars (and
    ``collections.OrderedDict``; bytes of protocol 2 come as ``_codecs.encode(s, 'latin1')``); any other global
    raises :class:`pickle.UnpicklingError` naming it (``.refused`` holds the name)."""

    refused: str | None = None

    def find_class(self, module: str, name: str):
        found = _NPY_GLOBALS.get((module, name))
        if found is None:
            self.refused = f"{module}.{name}"
            raise pickle.UnpicklingError(f"global '{module}.{name}' is not allowed")
        return found

    def persistent_load(self, pid):
        self.refused = "a persistent id"
        raise pickle.UnpicklingError("persistent ids are not allowed")


def restricted_loads(data: bytes) -> Any:
    """:class:`RestrictedUnpickler` over ``data`` (tests and tools)."""
    return RestrictedUnpickler(io.BytesIO(data), encoding="latin1").load()


def _read_npy_header(fh):
    version = np.lib.format.read_magic(fh)
    if version == (1, 0):
        return np.lib.format.read_array_header_1_0(fh)
    if version == (2, 0):
        return np.lib.format.read_array_header_2_0(fh)
    return np.lib.format._read_array_header(fh, version)  # 3.0: utf-8 header, no public reader


def load_npy(path: str | os.PathLike, what: str = ".npy file") -> Any:
    """Contents of a ``.npy`` file without running code: a plain array as ``np.load(allow_pickle=False)``
    gives it; an object array (``np.save`` of a dict, a list...) through :class:`RestrictedUnpickler`, returned
    as ``np.save`` stored it (a 0-d object array for a dict: ``.item()`` gives the dict).

    Raises FileNotFoundError (missing), :class:`UnsafeFileError` (needs other globals) or
    :class:`UnreadableFileError` (truncated, corrupt, not a ``.npy``), each one line naming the file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} '{path}' not found")
    try:
        with open(path, "rb") as fh:
            shape, fortran, dtype = _read_npy_header(fh)
            if not dtype.hasobject:
                fh.seek(0)
                return np.load(fh, allow_pickle=False)
            unpickler = RestrictedUnpickler(fh, encoding="latin1")
            try:
                obj = unpickler.load()
            except Exception:
                if unpickler.refused:
                    raise unsafe_error(path, what, unpickler.refused) from None
                raise
    except SafeLoadError:
        raise
    except Exception as err:  # noqa: BLE001 - truncated/corrupt files raise many types
        reason = one_line(err)[:160] or err.__class__.__name__
        raise UnreadableFileError(f"{what} '{path}' is unreadable ({err.__class__.__name__}: {reason})") from None
    if not isinstance(obj, np.ndarray):
        raise UnreadableFileError(f"{what} '{path}' holds a pickled {type(obj).__name__}, not an array")
    return obj


def load_npy_object(path: str | os.PathLike, what: str = ".npy file") -> Any:
    """The object a ``.npy`` file holds: for ``np.save(path, obj)`` of a dict/list the dict/list itself
    (:func:`load_npy` + ``.item()``), otherwise the array."""
    arr = load_npy(path, what)
    if arr.dtype == object and arr.shape == ():
        return arr.item()
    return arr


# ---------------------------------------------------------------------------------------------- torch
_GLOBAL_RE = re.compile(r"(?:GLOBAL|global) ([\w.]+)")


def torch_load(path: str | os.PathLike, what: str = "file", map_location="cpu") -> Any:
    """``torch.load(path, weights_only=True)`` with :func:`torch_safe_globals` allowed.

    Raises FileNotFoundError (missing), :class:`UnsafeFileError` (the file asks for another global: refused,
    nothing of it ran) or :class:`UnreadableFileError` (truncated, corrupt, not a torch file): one line each,
    naming the file."""
    import torch

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} '{path}' not found")
    try:
        with torch.serialization.safe_globals(torch_safe_globals()):
            return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as err:
        detail = str(err).split("WeightsUnpickler error:", 1)[-1]
        found = _GLOBAL_RE.search(detail)
        if found:
            raise unsafe_error(path, what, found.group(1)) from None
        if "Can only build" in detail:
            raise unsafe_error(path, what, "an object other than a tensor or array") from None
        reason = one_line(detail.split("Check the documentation", 1)[0])[:160]
        raise UnreadableFileError(f"{what} '{path}' is unreadable (UnpicklingError: {reason})") from None
    except Exception as err:  # noqa: BLE001 - truncated/corrupt files raise many types
        reason = (str(err).strip().splitlines() or [""])[0][:160] or err.__class__.__name__
        raise UnreadableFileError(f"{what} '{path}' is unreadable ({err.__class__.__name__}: {reason})") from None


# ------------------------------------------------------------------------------------ trusted conversion
def _sanitize(obj: Any, where: str, dropped: list) -> Any:
    """Keep tensors, arrays, numbers, strings and containers of them; anything else is dropped (listed)."""
    import torch

    if isinstance(obj, (torch.Tensor, str, bytes, bool, int, float, complex, type(None))):
        return obj
    if isinstance(obj, np.ndarray):
        if obj.dtype.hasobject:
            if obj.shape == ():
                return np.array(_sanitize(obj.item(), where, dropped), dtype=object)
            dropped.append(f"{where} (object array)")
            return None
        return obj
    if isinstance(obj, np.generic):
        return obj if obj.dtype.kind in _NUMERIC_KINDS else obj.item()
    if isinstance(obj, torch.Size):
        return tuple(obj)
    if isinstance(obj, dict):
        out = {}
        for k, v in obj.items():
            if not isinstance(k, (str, int, float, bool, tuple, type(None))):
                dropped.append(f"{where}[{k!r}] (key of type {type(k).__name__})")
                continue
            value = _sanitize(v, f"{where}[{k!r}]", dropped)
            if value is not None or v is None:
                out[k] = value
        return out
    if isinstance(obj, (list, tuple)):
        items = [_sanitize(v, f"{where}[{i}]", dropped) for i, v in enumerate(obj)]
        return items if isinstance(obj, list) else tuple(items)
    dropped.append(f"{where} ({type(obj).__module__}.{type(obj).__qualname__})")
    return None


def convert_trusted(src: str | os.PathLike, dst: str | os.PathLike) -> list[str]:
    """Load ``src`` with FULL unpickling (only for a file the user trusts), keep its tensors, arrays and plain
    containers, write them to ``dst`` and check that ``dst`` loads safely. Returns what was dropped."""
    import torch

    from .io import atomic_save

    src, dst = Path(src), Path(dst)
    if not src.is_file():
        raise FileNotFoundError(f"'{src}' not found")
    dropped: list[str] = []
    if src.suffix == ".npy":
        obj = np.load(src, allow_pickle=True)
        clean = _sanitize(obj, "file", dropped)

        def write(tmp):
            with open(tmp, "wb") as fh:
                np.save(fh, clean, allow_pickle=bool(getattr(clean, "dtype", None) == object))

        atomic_save(dst, write)
        load_npy(dst)
    else:
        obj = torch.load(src, map_location="cpu", weights_only=False)
        clean = _sanitize(obj, "file", dropped)
        atomic_save(dst, lambda tmp: torch.save(clean, tmp))
        torch_load(dst)
    return dropped


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m smaf.safe_load",
        description="Convert a .pth/.pt/.npy file that smaf refuses (it needs arbitrary unpickling) into a copy "
                    "that loads safely: tensors, arrays, numbers, strings and containers are kept, other objects "
                    "are dropped and listed. The input is unpickled in full: only for files you trust.")
    p.add_argument("src")
    p.add_argument("dst")
    p.add_argument("--trust-pickle", action="store_true",
                   help="required: confirms that SRC comes from a source you trust (unpickling it can run code)")
    args = p.parse_args(argv)
    if not args.trust_pickle:
        print(f"error: unpickling '{args.src}' can run code from it; pass --trust-pickle only for a file you "
              f"trust", file=sys.stderr)
        return EXIT_EXPECTED_ERROR
    try:
        dropped = convert_trusted(args.src, args.dst)
    except Exception as err:  # noqa: BLE001 - any failure of a one-off conversion is reported in one line
        print(f"error: cannot convert '{args.src}': {err.__class__.__name__}: {one_line(err)[:300]}",
              file=sys.stderr)
        return EXIT_EXPECTED_ERROR
    print(f"wrote {args.dst}" + (f"; dropped {len(dropped)}: {', '.join(dropped[:8])}"
                                 + (", ..." if len(dropped) > 8 else "") if dropped else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
