"""The binary wire format: ``.npz`` archives, read without ever unpickling.

A request is an npz (as ``numpy.savez`` or ``numpy.savez_compressed`` writes
it) with the arrays ``labels`` and ``pred_probs``. Each member's npy header is
read and checked (dtype, shape, declared size against the limit) *before*
anything of that size is allocated; then exactly the declared number of bytes
is read (decompressed at most that far, so a zip bomb stops there), and a
member holding more or fewer bytes than its header declares is rejected.
"""

from __future__ import annotations

import functools
import io
import math
import zipfile
import zlib
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, overload

import numpy as np

from service.errors import InputError, LabelqError, PayloadTooLarge
from service.settings import available_cpus

MEDIA_TYPE = "application/x-npz"
REQUIRED = ("labels", "pred_probs")
_ALLOWED_KINDS = {"labels": "iu", "pred_probs": "f"}
#: Arrays a caller may also admit (``extra``): the batched protocol's.
_EXTRA_KINDS = {"context": "u", "row_offset": "iu", "class_offsets": "iu"}


# --------------------------------------------------------------------------
# CRC-32 in parallel: zlib's crc32 releases the GIL, and the CRC of a
# concatenation follows from the pieces' CRCs (zlib's crc32_combine, written
# out here: appending n zero bytes is a linear map over GF(2), and the maps for
# n = 2**k are squares of each other). A 400 MB member takes 180 ms on one core.
# --------------------------------------------------------------------------

_CRC_PIECE = 16 << 20  # pieces at least this large are worth a thread
_crc_pool: ThreadPoolExecutor | None = None


@functools.cache
def _cpus() -> int:
    return available_cpus()


def _gf2_times(mat: list[int], vec: int) -> int:
    out, i = 0, 0
    while vec:
        if vec & 1:
            out ^= mat[i]
        vec >>= 1
        i += 1
    return out


def _gf2_square(mat: list[int]) -> list[int]:
    return [_gf2_times(mat, mat[n]) for n in range(32)]


def _zero_byte_maps() -> list[list[int]]:
    """maps[k]: the CRC register after appending 2**k zero bytes."""
    one_bit = [0xEDB88320] + [1 << n for n in range(31)]  # one zero bit
    m = _gf2_square(_gf2_square(_gf2_square(one_bit)))  # eight zero bits
    maps = []
    for _ in range(48):
        maps.append(m)
        m = _gf2_square(m)
    return maps


_ZERO_MAPS = _zero_byte_maps()


def crc32_combine(crc1: int, crc2: int, len2: int) -> int:
    """The CRC-32 of ``a + b`` from ``crc32(a)``, ``crc32(b)`` and ``len(b)``."""
    k = 0
    while len2:
        if len2 & 1:
            crc1 = _gf2_times(_ZERO_MAPS[k], crc1)
        len2 >>= 1
        k += 1
    return crc1 ^ crc2


def crc32(data: memoryview, threads: int | None = None) -> int:
    """zlib.crc32 of ``data``, computed in pieces on up to ``threads`` threads
    (default: the CPUs this process may use, as for the kernels)."""
    global _crc_pool
    n = len(data)
    threads = threads or _cpus()
    parts = min(threads, n // _CRC_PIECE)
    if parts < 2:
        return zlib.crc32(data)
    if _crc_pool is None:
        _crc_pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="labelq-crc")
    cuts = [n * t // parts for t in range(parts + 1)]
    crcs = list(_crc_pool.map(zlib.crc32, [data[a:b] for a, b in zip(cuts, cuts[1:], strict=False)]))
    out = crcs[0]
    for t in range(1, parts):
        out = crc32_combine(out, crcs[t], cuts[t + 1] - cuts[t])
    return out


class MalformedNpz(LabelqError):
    status = 400
    title = "Malformed request body"
    type = "https://labelq.invalid/problems/malformed-body"


def read_request(
    body: bytes,
    max_cells: int,
    optional: tuple[str, ...] = (),
    admit: Callable[[dict[str, tuple[tuple[int, ...], np.dtype]]], None] | None = None,
    extra: tuple[str, ...] = (),
) -> dict[str, np.ndarray]:
    """Parse an npz request body into ``{"labels": ..., "pred_probs": ...}``;
    an array named in ``optional`` may be absent (and is then not in the dict).
    Every member's header is read and checked first; then ``admit`` (if given)
    sees every declared ``(shape, dtype)`` and may refuse by raising, before
    anything of their size is allocated. ``extra`` names further optional
    arrays (of ``_EXTRA_KINDS``) the caller accepts.

    Raises:
        MalformedNpz (400): not a zip archive, corrupt or truncated members.
        InputError (422): missing or unexpected arrays, bad dtypes, pickled
            objects, headers that disagree with the data.
        PayloadTooLarge (413): a declared shape over ``max_cells`` elements.
    """
    try:
        archive = zipfile.ZipFile(io.BytesIO(body))
    except (zipfile.BadZipFile, ValueError) as exc:
        raise MalformedNpz(f"the body is not an npz (zip) archive: {exc}", "body") from None
    members = {name[:-4] if name.endswith(".npy") else name: name for name in archive.namelist()}
    allowed = REQUIRED + extra
    for name in members:
        if name not in allowed:
            raise InputError(f"unexpected array {name!r}; this npz request holds: {', '.join(allowed)}", name)
    for name in REQUIRED:
        if name not in members and name not in optional:
            raise InputError(f"the npz has no array {name!r}", name)
    present = [name for name in allowed if name in members]
    headers = {name: _member(archive, members[name], name, max_cells) for name in present}
    if admit is not None:
        admit({name: (shape, dtype) for name, (shape, _, dtype) in headers.items()})
    return {name: _member(archive, members[name], name, max_cells, headers[name], body) for name in present}


_Header = tuple[tuple[int, ...], bool, np.dtype]


@overload
def _member(archive: zipfile.ZipFile, member: str, name: str, max_cells: int) -> _Header: ...
@overload
def _member(
    archive: zipfile.ZipFile, member: str, name: str, max_cells: int, header: _Header, body: bytes
) -> np.ndarray: ...


def _member(
    archive: zipfile.ZipFile,
    member: str,
    name: str,
    max_cells: int,
    header: _Header | None = None,
    body: bytes = b"",
) -> _Header | np.ndarray:
    """Without ``header``: read and check a member's npy header only. With it
    (as read before): read the member's data; a stored (uncompressed) member
    is viewed in ``body`` without a copy, once its CRC is checked."""
    try:
        with archive.open(member) as f:
            try:
                version = np.lib.format.read_magic(f)
                if version == (1, 0):
                    shape, fortran, dtype = np.lib.format.read_array_header_1_0(f)
                else:
                    shape, fortran, dtype = np.lib.format.read_array_header_2_0(f)
            except (ValueError, SyntaxError, TypeError) as exc:
                raise InputError(f"is not a valid .npy array: {exc}", name) from None
            if header is None:
                _check_header(name, shape, dtype, max_cells)
                return shape, fortran, dtype
            nbytes = math.prod(shape) * dtype.itemsize
            info = archive.getinfo(member)
            if info.compress_type == zipfile.ZIP_STORED and body:
                return _stored(body, info, f.tell(), nbytes, shape, fortran, dtype, name)
            data = f.read(nbytes)
            if len(data) != nbytes:
                raise InputError(f"its header declares {nbytes} bytes of data but the member holds {len(data)}", name)
            if f.read(1):
                raise InputError("holds more data than its header declares", name)
    except zipfile.BadZipFile as exc:
        raise MalformedNpz(f"the npz member for {name!r} is corrupt: {exc}", name) from None
    except (EOFError, OSError, RuntimeError, NotImplementedError) as exc:  # truncated or unsupported compression
        raise MalformedNpz(f"the npz member for {name!r} cannot be read: {exc}", name) from None
    arr = np.frombuffer(data, dtype=dtype).reshape(shape, order="F" if fortran else "C")
    if not arr.dtype.isnative:
        arr = arr.astype(arr.dtype.newbyteorder("="))
    return arr


def _stored(
    body: bytes, info: zipfile.ZipInfo, pos: int, nbytes: int, shape: tuple[int, ...], fortran: bool,
    dtype: np.dtype, name: str,
) -> np.ndarray:
    """The array of a stored member, viewed in the body (copied only when its
    data is not aligned for its dtype): reading it through ``zipfile`` would
    copy it in small pieces, several times slower."""
    local = body[info.header_offset : info.header_offset + 30]
    if len(local) != 30 or local[:4] != b"PK\x03\x04":
        raise MalformedNpz(f"the npz member for {name!r} has no valid local header", name)
    start = info.header_offset + 30 + int.from_bytes(local[26:28], "little") + int.from_bytes(local[28:30], "little")
    end = start + info.file_size
    if end > len(body):
        raise MalformedNpz(f"the npz member for {name!r} is truncated", name)
    if crc32(memoryview(body)[start:end]) != info.CRC:
        raise MalformedNpz(f"the npz member for {name!r} is corrupt (CRC mismatch)", name)
    if pos + nbytes != info.file_size:
        have = info.file_size - pos
        if have < nbytes:
            raise InputError(f"its header declares {nbytes} bytes of data but the member holds {have}", name)
        raise InputError("holds more data than its header declares", name)
    arr = np.frombuffer(body, dtype=dtype, count=math.prod(shape), offset=start + pos)
    if arr.ctypes.data % max(1, dtype.alignment):
        arr = arr.copy()
    arr = arr.reshape(shape, order="F" if fortran else "C")
    if not arr.dtype.isnative:
        arr = arr.astype(arr.dtype.newbyteorder("="))
    return arr


def _check_header(name: str, shape: tuple[int, ...], dtype: np.dtype, max_cells: int) -> None:
    if any(d < 0 for d in shape):  # else the data read below would be unbounded: f.read(negative)
        raise InputError(f"declares shape {shape}, with a negative dimension", name)
    if dtype.hasobject:
        raise InputError("holds Python objects; only numeric arrays are accepted (pickles are never loaded)", name)
    kinds = _ALLOWED_KINDS.get(name) or _EXTRA_KINDS[name]
    if dtype.kind not in kinds:
        want = {"iu": "integers", "u": "uint8 bytes", "f": "float16, float32 or float64"}[kinds]
        raise InputError(f"must be {want}; got dtype {dtype}", name)
    cells = math.prod(shape)
    if cells > max_cells:
        raise PayloadTooLarge(
            f"declares shape {shape} ({cells} elements); the limit is {max_cells} elements (LABELQ_MAX_CELLS)",
            name,
        )


def write_response(fields: dict[str, Any]) -> bytes:
    """One npz holding every field; nested dicts are flattened (their keys are
    unique), and fields that are None (absent, JSON null) are left out."""
    flat: dict[str, np.ndarray] = {}

    def add(d: dict[str, Any]) -> None:
        for key, value in d.items():
            if isinstance(value, dict):
                add(value)
            elif value is not None:
                flat[key] = np.asarray(value)

    add(fields)
    out = io.BytesIO()
    np.savez(out, **flat)
    return out.getvalue()
