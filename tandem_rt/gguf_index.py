"""The index of a GGUF file: its metadata (scalars and strings decoded, arrays of strings
counted but not decoded) and its tensor infos (names, shapes, ggml types, data offsets).

``gguf.GGUFReader`` builds a numpy view of every metadata value, including each of a tokenizer's
~100 k vocabulary and merge strings: 3.5-5.5 s for SmolLM2-135M's file on a 2-core AMD EPYC. A
model's config and its tensors need none of those strings, so this reader steps over string arrays
(one length read per string): 0.02 s for the same file. ``tandem_rt.gguf`` reads configs and
tensors through it; the tokenizer is built from the metadata by transformers.

Format (GGUF v2 / v3, little-endian; https://github.com/ggml-org/ggml/blob/master/docs/gguf.md):
``b"GGUF"``, u32 version, u64 tensor count, u64 metadata count; the metadata as (string key, u32
value type, value); the tensor infos as (string name, u32 n_dims, u64 dims[n_dims] — innermost
first —, u32 ggml type, u64 offset from the data section); the data section starts at the next
multiple of ``general.alignment`` (default 32). A string is a u64 byte count and the bytes.

Public API::

    read_index(path) -> GGUFIndex            # .fields {key: GGUFField}, .tensors [GGUFTensorInfo]
    read_tensor_index(path) -> list[GGUFTensorInfo]
"""
from __future__ import annotations

import mmap
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Union

import numpy as np

PathLike = Union[str, Path]

_MAGIC = b"GGUF"
_VERSIONS = (2, 3)
_STRING, _ARRAY = 8, 9
# metadata value type -> byte size of the scalar types
_SCALAR_BYTES = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}
_DEFAULT_ALIGNMENT = 32
# metadata value type -> struct format of the scalar types
_SCALAR_FORMAT = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_SCALAR_DTYPE = {0: "<u1", 1: "<i1", 2: "<u2", 3: "<i2", 4: "<u4", 5: "<i4", 6: "<f4", 7: "<u1", 10: "<u8", 11: "<i8",
                 12: "<f8"}


@dataclass(frozen=True)
class GGUFField:
    """One metadata value.

    Attributes:
        name: the key (e.g. ``"llama.embedding_length"``).
        value: a scalar (int, float, bool) or str; for an array of scalars a 1-D numpy array; for
            an array of strings or of arrays None (not decoded).
        count: elements of an array (1 for a scalar or string).
    """
    name: str
    value: object
    count: int = 1

    def contents(self):
        """The value (an array as a list), as ``gguf.ReaderField.contents``; ValueError for an
        array whose elements the index does not decode."""
        if self.value is None:
            raise ValueError(f"GGUF field {self.name!r}: an array of {self.count} strings or arrays, not decoded")
        return self.value.tolist() if isinstance(self.value, np.ndarray) else self.value

    @property
    def data(self):
        """A sequence of ``count`` items (``len(field.data)`` is the array's length, as with
        ``gguf.ReaderField``)."""
        return range(self.count) if self.value is None or not isinstance(self.value, np.ndarray) else self.value


@dataclass(frozen=True)
class GGUFTensorInfo:
    """One tensor of a GGUF file.

    Attributes:
        name: the llama.cpp tensor name (e.g. ``"blk.0.attn_q.weight"``).
        shape: ggml dimensions, innermost first (a ``[N, K]`` matrix is ``(K, N)``).
        ggml_type: the ggml type id (0 F32, 1 F16, 2 Q4_0, 3 Q4_1, 8 Q8_0, 30 BF16, ...).
        offset: absolute byte offset of the tensor's data in the file.
    """
    name: str
    shape: tuple
    ggml_type: int
    offset: int


@dataclass(frozen=True)
class GGUFIndex:
    """A GGUF file's metadata and tensor infos (data not read).

    Attributes:
        path: the file.
        version: the GGUF version (2 or 3).
        fields: ``{key: GGUFField}`` in file order.
        tensors: ``[GGUFTensorInfo]`` in file order (offsets absolute).
    """
    path: Path
    version: int
    fields: dict
    tensors: list


class _Cursor:
    """Bounds-checked little-endian reads from a buffer."""

    def __init__(self, buf, file: Path):
        self.buf, self.pos, self.file = buf, 0, file

    def take(self, fmt: str):
        size = struct.calcsize(fmt)
        if self.pos + size > len(self.buf):
            raise ValueError(f"{self.file} is not a readable GGUF file: it ends inside its header "
                             f"(byte {self.pos} of {len(self.buf)})")
        vals = struct.unpack_from(fmt, self.buf, self.pos)
        self.pos += size
        return vals[0] if len(vals) == 1 else vals

    def skip(self, nbytes: int) -> None:
        if nbytes < 0 or self.pos + nbytes > len(self.buf):
            raise ValueError(f"{self.file} is not a readable GGUF file: a field of {nbytes} bytes at byte "
                             f"{self.pos} runs past its end ({len(self.buf)} bytes)")
        self.pos += nbytes

    def string(self) -> str:
        n = self.take("<Q")
        start = self.pos
        self.skip(n)
        try:
            return bytes(self.buf[start:start + n]).decode("utf-8")
        except UnicodeDecodeError:
            raise ValueError(f"{self.file} is not a readable GGUF file: a string at byte {start} is not UTF-8") from None

    def value(self, key: str, vtype: int) -> GGUFField:
        """The value of type ``vtype`` at the cursor, decoded as :class:`GGUFField` describes."""
        if vtype in _SCALAR_FORMAT:
            return GGUFField(key, self.take(_SCALAR_FORMAT[vtype]))
        if vtype == _STRING:
            return GGUFField(key, self.string())
        if vtype != _ARRAY:
            self.unknown(vtype)
        etype, count = self.take("<IQ")
        if etype in _SCALAR_BYTES:
            start = self.pos
            self.skip(count * _SCALAR_BYTES[etype])
            arr = np.frombuffer(self.buf, dtype=_SCALAR_DTYPE[etype], count=count, offset=start).copy()
            return GGUFField(key, arr.astype(bool) if etype == 7 else arr, count)
        self.skip_elements(etype, count)
        return GGUFField(key, None, count)

    def skip_elements(self, etype: int, count: int) -> None:
        """Steps over ``count`` array elements of type ``etype`` (strings: one length read each)."""
        if etype in _SCALAR_BYTES:
            self.skip(count * _SCALAR_BYTES[etype])
        elif etype == _STRING:
            buf, pos, end = self.buf, self.pos, len(self.buf)
            for _ in range(count):
                if pos + 8 > end:
                    self.pos = pos
                    self.take("<Q")    # raises: the file ends inside the array
                pos += 8 + struct.unpack_from("<Q", buf, pos)[0]
            self.pos = pos
            if pos > end:
                raise ValueError(f"{self.file} is not a readable GGUF file: a string array runs past its end")
        elif etype == _ARRAY:
            for _ in range(count):
                self.skip_elements(*self.take("<IQ"))
        else:
            self.unknown(etype)

    def unknown(self, vtype: int):
        raise ValueError(f"{self.file} is not a readable GGUF file: unknown metadata value type {vtype} "
                         f"at byte {self.pos - 4}")


def read_index(path: PathLike) -> GGUFIndex:
    """The metadata and tensor infos of a GGUF v2 / v3 little-endian file.

    Args:
        path: the GGUF file.
    Returns:
        :class:`GGUFIndex` (tensor offsets absolute; tensor data not read).
    Raises:
        ValueError naming the file: missing, not GGUF (magic), an unsupported version or byte
        order, a header that ends early or runs past the file, an unknown value type, a duplicated
        tensor name, or a tensor whose offset lies past the end of the file.
    """
    file = Path(path)
    if not file.is_file():
        raise ValueError(f"{file} does not exist")
    size = file.stat().st_size
    if size < 24:
        raise ValueError(f"{file} is not a readable GGUF file: {size} bytes")
    with open(file, "rb") as fh, mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as buf:
        if buf[:4] != _MAGIC:
            raise ValueError(f"{file} is not a readable GGUF file: magic {bytes(buf[:4])!r}, expected {_MAGIC!r}")
        cur = _Cursor(buf, file)
        cur.skip(4)
        version = cur.take("<I")
        if version not in _VERSIONS:
            swapped = struct.unpack(">I", struct.pack("<I", version))[0]
            what = "big-endian" if swapped in _VERSIONS else f"version {version}"
            raise ValueError(f"{file}: {what} GGUF files are not supported (little-endian v2 / v3 are)")
        n_tensors, n_kv = cur.take("<QQ")
        fields = {}
        for _ in range(n_kv):
            key = cur.string()
            fields[key] = cur.value(key, cur.take("<I"))
        alignment = fields.get("general.alignment")
        alignment = _DEFAULT_ALIGNMENT if alignment is None else alignment.value
        if not isinstance(alignment, int) or alignment <= 0 or alignment & (alignment - 1):
            raise ValueError(f"{file}: general.alignment must be a power of two, got {alignment!r}")
        infos, names = [], set()
        for _ in range(n_tensors):
            name = cur.string()
            if name in names:
                raise ValueError(f"{file}: tensor {name!r} appears twice")
            names.add(name)
            n_dims = cur.take("<I")
            if not 1 <= n_dims <= 4:
                raise ValueError(f"{file}: tensor {name!r} has {n_dims} dimensions (1..4 expected)")
            shape = tuple(cur.take(f"<{n_dims}Q")) if n_dims > 1 else (cur.take("<Q"),)
            ggml_type, offset = cur.take("<IQ")
            infos.append((name, shape, ggml_type, offset))
        data_start = -(-cur.pos // alignment) * alignment
    tensors = []
    for name, shape, ggml_type, offset in infos:
        at = data_start + offset
        if at > size:
            raise ValueError(f"{file}: tensor {name!r} starts at byte {at}, past the end of the file ({size} bytes)")
        tensors.append(GGUFTensorInfo(name, shape, ggml_type, at))
    return GGUFIndex(file, version, fields, tensors)


def read_tensor_index(path: PathLike) -> list:
    """``read_index(path).tensors``: the tensor infos of a GGUF file, in file order."""
    return read_index(path).tensors


__all__ = ["GGUFField", "GGUFIndex", "GGUFTensorInfo", "read_index", "read_tensor_index"]
