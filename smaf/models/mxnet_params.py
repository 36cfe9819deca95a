"""Reader for MXNet NDArray-list files (``.params``, written by ``mx.nd.save`` / ``mx.model.save_checkpoint``),
in plain Python + NumPy: MXNet is not needed (and hard to install on current Python).

File layout (all integers little-endian), as in MXNet's ``src/ndarray/ndarray.cc`` (``NDArray::Save/Load`` for
lists, ``NDArray::Save``, ``NDArray::Load`` and ``NDArray::LegacyLoad`` for one array) and dmlc-core's
serializer (a vector = uint64 count + elements; a string = uint64 length + bytes)::

    uint64 0x112 (kMXAPINDArrayListMagic), uint64 reserved (0)
    uint64 N, then N arrays
    uint64 number of names (N, or 0 for an unnamed list), then each name: uint64 length + UTF-8 bytes

One array, in the layouts MXNet has written over time:

* legacy (no magic): the first uint32 is ndim itself, then ndim x uint32 dims;
* V1 (uint32 magic 0xF993FAC8): int32 ndim + ndim x int64 dims;
* V2 (0xF993FAC9) / V3 (0xF993FACA, NumPy shape semantics): int32 storage type (0 = dense; row_sparse and csr are
  rejected), then int32 ndim + ndim x int64 dims;

then, unless the shape marks an empty (uninitialised) array (ndim 0 for legacy/V1/V2, an unknown ndim or dim -1
for V3, where ndim 0 is a scalar), the context (int32 dev_type, int32 dev_id), an int32 mshadow type flag and the
raw C-order data. Type flags: 0 float32, 1 float64, 2 float16, 3 uint8, 4 int32, 5 int8, 6 int64, 7 bool,
8 int16, 9 uint16, 10 uint32, 11 uint64, 12 bfloat16 (returned as float32, exactly).

Names in a checkpoint carry ``arg:`` (parameters) or ``aux:`` (BN moving statistics) prefixes, e.g.
``arg:res2a_branch1_weight``, ``arg:bn2a_branch2a_gamma``, ``aux:bn2a_branch2a_moving_mean``; they are returned
as stored (the conversion strips them).
"""
from __future__ import annotations

import math
import os
import struct
import warnings
from pathlib import Path
from typing import BinaryIO

import numpy as np

LIST_MAGIC = 0x112
NDARRAY_V1_MAGIC = 0xF993FAC8
NDARRAY_V2_MAGIC = 0xF993FAC9
NDARRAY_V3_MAGIC = 0xF993FACA

# mshadow TypeFlag -> NumPy dtype (little-endian). bfloat16 (12) is handled separately.
TYPE_FLAG_DTYPES: dict[int, np.dtype] = {
    0: np.dtype("<f4"), 1: np.dtype("<f8"), 2: np.dtype("<f2"), 3: np.dtype("u1"), 4: np.dtype("<i4"),
    5: np.dtype("i1"), 6: np.dtype("<i8"), 7: np.dtype("?"), 8: np.dtype("<i2"), 9: np.dtype("<u2"),
    10: np.dtype("<u4"), 11: np.dtype("<u8"),
}
BFLOAT16_TYPE_FLAG = 12
STORAGE_TYPE_NAMES = {-1: "undefined", 0: "default", 1: "row_sparse", 2: "csr"}

# Sanity bounds that turn a corrupt header into a clear error instead of a huge allocation.
_MAX_NDIM = 32
_MAX_ARRAYS = 1_000_000
_MAX_NAME_BYTES = 1 << 20


class _Stream:
    """Bounds-checked little-endian reads from an open file; errors name the file, the item and the offset."""

    def __init__(self, handle: BinaryIO, path: Path, size: int):
        self.handle = handle
        self.path = path
        self.size = size

    @property
    def offset(self) -> int:
        return self.handle.tell()

    def fail(self, message: str) -> ValueError:
        return ValueError(f"{self.path}: not a valid MXNet .params file: {message}")

    def read(self, nbytes: int, what: str) -> bytes:
        start = self.offset
        data = self.handle.read(nbytes)
        if len(data) != nbytes:
            raise self.fail(f"truncated at byte {start}: expected {what} ({nbytes} bytes), "
                            f"found {len(data)} (file size {self.size})")
        return data

    def unpack(self, fmt: str, what: str) -> tuple:
        return struct.unpack("<" + fmt, self.read(struct.calcsize("<" + fmt), what))

    def read_array_data(self, dtype: np.dtype, count: int, what: str) -> np.ndarray:
        """``count`` items of ``dtype`` read straight into a new writable array (no intermediate bytes copy)."""
        nbytes = count * dtype.itemsize
        start = self.offset
        if start + nbytes > self.size:
            raise self.fail(f"truncated at byte {start}: expected {what} ({nbytes} bytes), "
                            f"found {self.size - start} (file size {self.size})")
        out = np.empty(count, dtype=dtype)
        if nbytes and self.handle.readinto(memoryview(out).cast("B")) != nbytes:
            raise self.fail(f"short read at byte {start} for {what}")
        return out


def _read_shape(stream: _Stream, ndim: int, dim_format: str, what: str) -> tuple[int, ...]:
    if ndim > _MAX_NDIM or ndim < -1:
        raise stream.fail(f"{what}: implausible ndim {ndim} at byte {stream.offset - 4}")
    return stream.unpack(f"{ndim}{dim_format}", f"{what} shape ({ndim} dims)") if ndim > 0 else ()


def _read_ndarray(stream: _Stream, what: str) -> np.ndarray | None:
    """One serialised NDArray -> NumPy array, or None for an empty (uninitialised) NDArray."""
    (head,) = stream.unpack("I", f"{what} header")
    if head in (NDARRAY_V2_MAGIC, NDARRAY_V3_MAGIC):
        (storage_type,) = stream.unpack("i", f"{what} storage type")
        if storage_type != 0:
            kind = STORAGE_TYPE_NAMES.get(storage_type, f"unknown ({storage_type})")
            raise stream.fail(f"{what} has {kind} storage; only dense (default storage) arrays are supported")
        (ndim,) = stream.unpack("i", f"{what} ndim")
        if head == NDARRAY_V3_MAGIC:
            if ndim == -1:  # unknown shape: an empty NDArray, nothing follows
                return None
            shape = _read_shape(stream, ndim, "q", what)
            if any(d == -1 for d in shape):
                return None
        else:
            shape = _read_shape(stream, ndim, "q", what)
            if ndim <= 0:  # legacy shape semantics: ndim 0 (or unknown, -1) = empty NDArray
                return None
    elif head == NDARRAY_V1_MAGIC:
        (ndim,) = stream.unpack("i", f"{what} ndim")
        shape = _read_shape(stream, ndim, "q", what)
        if ndim <= 0:
            return None
    else:  # legacy layout: no magic, this word is ndim and dims are uint32
        ndim = head
        shape = _read_shape(stream, ndim, "I", what)
        if ndim == 0:
            return None
    if any(d < 0 for d in shape):
        raise stream.fail(f"{what}: negative dimension in shape {shape}")

    stream.unpack("ii", f"{what} context (dev_type, dev_id)")  # where it lived when saved; irrelevant here
    (type_flag,) = stream.unpack("i", f"{what} type flag")
    count = math.prod(shape)  # Python ints: corrupt dims give a clear size error, not an overflow
    if type_flag == BFLOAT16_TYPE_FLAG:
        raw = stream.read_array_data(np.dtype("<u2"), count, f"{what} data ({count} bfloat16)")
        # bfloat16 is the top half of a float32: widening is exact.
        return (raw.astype(np.uint32) << 16).view(np.float32).reshape(shape)
    if type_flag not in TYPE_FLAG_DTYPES:
        raise stream.fail(f"{what}: unknown type flag {type_flag} (known: 0..12)")
    dtype = TYPE_FLAG_DTYPES[type_flag]
    data = stream.read_array_data(dtype, count, f"{what} data ({count} x {dtype.name})")
    return data.reshape(shape)


def read_mxnet_params(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Read an MXNet NDArray-list file into ``{name: array}`` with names as stored (``arg:conv1a_weight`` ...).

    Arrays keep their stored dtype and shape (a V3 scalar has shape ()); empty (uninitialised) NDArrays are
    left out with a warning; an unnamed list gets the names '0', '1', ... A missing file raises
    FileNotFoundError; a truncated or corrupt file raises ValueError naming the file and what was expected where.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"MXNet .params file not found: {path}")
    size = path.stat().st_size
    with open(path, "rb") as handle:
        stream = _Stream(handle, path, size)
        magic, _reserved = stream.unpack("QQ", "list header (uint64 magic 0x112, uint64 reserved)")
        if magic != LIST_MAGIC:
            raise stream.fail(f"list magic is {magic:#x}, expected {LIST_MAGIC:#x} (an NDArray list written by "
                              "mx.nd.save / save_checkpoint)")
        (num_arrays,) = stream.unpack("Q", "array count")
        if num_arrays > _MAX_ARRAYS:
            raise stream.fail(f"implausible array count {num_arrays}")
        arrays = [_read_ndarray(stream, f"array {i} of {num_arrays}") for i in range(num_arrays)]

        (num_names,) = stream.unpack("Q", "name count")
        if num_names not in (0, num_arrays):
            raise stream.fail(f"{num_names} names for {num_arrays} arrays")
        names = []
        for i in range(num_names):
            (length,) = stream.unpack("Q", f"length of name {i}")
            if length > _MAX_NAME_BYTES:
                raise stream.fail(f"implausible length {length} of name {i}")
            raw = stream.read(length, f"name {i} ({length} bytes)")
            try:
                names.append(raw.decode("utf-8"))
            except UnicodeDecodeError:
                raise stream.fail(f"name {i} is not UTF-8: {raw[:40]!r}") from None
    if not names:
        names = [str(i) for i in range(num_arrays)]
    if len(set(names)) != len(names):
        duplicates = sorted({n for n in names if names.count(n) > 1})
        raise ValueError(f"{path}: not a valid MXNet .params file: duplicate names {', '.join(duplicates[:5])}")

    result: dict[str, np.ndarray] = {}
    empty = []
    for name, array in zip(names, arrays):
        if array is None:
            empty.append(name)
        else:
            result[name] = array
    if empty:
        warnings.warn(f"{path}: skipped {len(empty)} empty (uninitialised) NDArrays: {', '.join(empty[:5])}",
                      stacklevel=2)
    return result
