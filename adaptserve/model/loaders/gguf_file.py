"""Reading a GGUF file's header: its metadata, its tensor table and where the tensor data starts.

gguf.GGUFReader parses the same header, but it builds a numpy view for every element of every
metadata array, which takes about 3.5 s for the 98k tokenizer strings of SmolLM2 (and transformers'
GGUF loading pays that twice). Unpacking with `struct` takes about 0.2 s. Every read is checked
against the file size, so a damaged file gives one clear ModelLoadError instead of a numpy error.

Layout (little-endian): magic "GGUF", u32 version, u64 tensor count, u64 metadata count, the
metadata (key string, u32 value type, value), the tensor table (name, u32 n_dims, u64 dims fastest
first, u32 ggml type, u64 offset), padding to `general.alignment`, then the tensor data.
"""

from __future__ import annotations

import mmap
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gguf import GGML_QUANT_SIZES, GGUF_DEFAULT_ALIGNMENT, GGMLQuantizationType, GGUFValueType

from adaptserve.model.loaders.checkpoint import ModelLoadError

_VERSIONS = (2, 3)  # v1 counted in 32 bits and is long gone
_MAX_DIMS = 4  # GGML_MAX_DIMS
_SCALAR_CODES = {
    GGUFValueType.UINT8: "B", GGUFValueType.INT8: "b", GGUFValueType.UINT16: "H", GGUFValueType.INT16: "h",
    GGUFValueType.UINT32: "I", GGUFValueType.INT32: "i", GGUFValueType.FLOAT32: "f", GGUFValueType.BOOL: "?",
    GGUFValueType.UINT64: "Q", GGUFValueType.INT64: "q", GGUFValueType.FLOAT64: "d",
}  # fmt: skip
_U64 = struct.Struct("<Q")


class _Truncated(Exception):
    """A read ran past the end of the file."""


@dataclass(frozen=True, slots=True)
class GGUFTensorInfo:
    name: str
    shape: tuple[int, ...]  # torch order: rows first (GGUF stores the fastest-moving dimension first)
    ggml_type: GGMLQuantizationType
    offset: int  # absolute byte offset of the data in the file
    nbytes: int


@dataclass(frozen=True, slots=True)
class GGUFHeader:
    path: str
    version: int
    metadata: dict[str, Any]  # arrays as lists, strings as str
    tensors: dict[str, GGUFTensorInfo]  # in file order
    data_offset: int  # where the tensor data section begins


def read_gguf_header(path: str | Path) -> GGUFHeader:
    """Parse a GGUF file's metadata and tensor table without reading tensor data."""
    path = str(path)
    try:
        with open(path, "rb") as f:
            size = f.seek(0, 2)
            if size < 24:
                raise _Truncated
            with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
                return _Parser(buf, size, path).header()
    except ModelLoadError:
        raise
    except _Truncated:
        raise ModelLoadError(
            f"{path}: the GGUF file is truncated or corrupt (it ends inside its header)"
        ) from None
    except (UnicodeDecodeError, ValueError, OverflowError, MemoryError, struct.error) as e:
        raise ModelLoadError(f"{path}: the GGUF file is corrupt ({type(e).__name__}: {e})") from e
    except OSError as e:
        raise ModelLoadError(f"{path}: cannot read the file ({e})") from e


class _Parser:
    def __init__(self, buf: mmap.mmap, size: int, path: str):
        self.buf, self.size, self.path, self.pos = buf, size, path, 0

    def header(self) -> GGUFHeader:
        if self.buf[:4] != b"GGUF":
            raise ModelLoadError(
                f"{self.path}: not a GGUF file (bad magic {bytes(self.buf[:4])!r}); corrupt or wrong file"
            )
        self.pos = 4
        (version,) = self.unpack("I")
        if version & 0xFFFF == 0:  # a small version number read with the wrong byte order
            raise ModelLoadError(f"{self.path}: big-endian GGUF files are not supported")
        if version not in _VERSIONS:
            raise ModelLoadError(
                f"{self.path}: GGUF version {version} is not supported (supported: {_VERSIONS})"
            )
        num_tensors, num_kv = self.unpack("QQ")
        if num_tensors > self.size or num_kv > self.size:
            raise ModelLoadError(f"{self.path}: the GGUF file is corrupt (counts {num_tensors}, {num_kv})")
        metadata: dict[str, Any] = {}
        for _ in range(num_kv):
            key = self.string()
            (value_type,) = self.unpack("I")
            if key in metadata:
                raise ModelLoadError(f"{self.path}: the GGUF file is corrupt (metadata key {key!r} twice)")
            metadata[key] = self.value(value_type)
        table = [self.tensor_entry() for _ in range(num_tensors)]
        alignment = metadata.get("general.alignment", GGUF_DEFAULT_ALIGNMENT)
        if not isinstance(alignment, int) or alignment <= 0 or alignment & (alignment - 1):
            raise ModelLoadError(f"{self.path}: the GGUF file is corrupt (general.alignment={alignment!r})")
        data_offset = -(-self.pos // alignment) * alignment
        tensors = {}
        for name, shape, ggml_type, offset in table:
            if name in tensors:
                raise ModelLoadError(f"{self.path}: the GGUF file is corrupt (tensor {name!r} twice)")
            tensors[name] = self.tensor_info(name, shape, ggml_type, data_offset + offset)
        return GGUFHeader(self.path, version, metadata, tensors, data_offset)

    def unpack(self, codes: str) -> tuple:
        fmt = struct.Struct("<" + codes)
        if self.pos + fmt.size > self.size:
            raise _Truncated
        values = fmt.unpack_from(self.buf, self.pos)
        self.pos += fmt.size
        return values

    def string(self) -> str:
        (length,) = self.unpack("Q")
        end = self.pos + length
        if end > self.size:
            raise _Truncated
        text = self.buf[self.pos : end].decode("utf-8")
        self.pos = end
        return text

    def value(self, value_type: int) -> Any:
        if value_type in _SCALAR_CODES:
            return self.unpack(_SCALAR_CODES[value_type])[0]
        if value_type == GGUFValueType.STRING:
            return self.string()
        if value_type == GGUFValueType.ARRAY:
            item_type, count = self.unpack("IQ")
            if count > self.size - self.pos:  # every item takes at least one byte
                raise _Truncated
            if item_type in _SCALAR_CODES:
                return list(self.unpack(f"{count}{_SCALAR_CODES[item_type]}"))
            if item_type == GGUFValueType.STRING:
                return self.strings(count)
            return [self.value(item_type) for _ in range(count)]
        raise ModelLoadError(
            f"{self.path}: the GGUF file is corrupt (unknown metadata value type {value_type})"
        )

    def strings(self, count: int) -> list[str]:
        """`count` strings in a tight loop: tokenizer vocabularies hold ~10^5 of them."""
        buf, pos, size, unpack_u64 = self.buf, self.pos, self.size, _U64.unpack_from
        out = []
        for _ in range(count):
            if pos + 8 > size:
                raise _Truncated
            (length,) = unpack_u64(buf, pos)
            end = pos + 8 + length
            if end > size:
                raise _Truncated
            out.append(buf[pos + 8 : end].decode("utf-8"))
            pos = end
        self.pos = pos
        return out

    def tensor_entry(self) -> tuple[str, tuple[int, ...], int, int]:
        name = self.string()
        (num_dims,) = self.unpack("I")
        if not 1 <= num_dims <= _MAX_DIMS:
            raise ModelLoadError(
                f"{self.path}: the GGUF file is corrupt (tensor {name!r} has {num_dims} dims)"
            )
        dims = self.unpack(f"{num_dims}Q")
        ggml_type, offset = self.unpack("IQ")
        return name, tuple(reversed(dims)), ggml_type, offset

    def tensor_info(self, name: str, shape: tuple[int, ...], type_id: int, offset: int) -> GGUFTensorInfo:
        try:
            ggml_type = GGMLQuantizationType(type_id)
        except ValueError:
            raise ModelLoadError(
                f"{self.path}: tensor {name!r} has unknown ggml type id {type_id} (corrupt file, or a newer "
                "GGUF type than the installed gguf package knows)"
            ) from None
        block_size, type_size = GGML_QUANT_SIZES[ggml_type]
        num_elements = 1
        for dim in shape:
            num_elements *= dim
        if shape[-1] % block_size:
            raise ModelLoadError(
                f"{self.path}: the GGUF file is corrupt (tensor {name!r} of shape {shape} does not fit "
                f"{ggml_type.name} blocks of {block_size})"
            )
        nbytes = num_elements // block_size * type_size
        if offset + nbytes > self.size:
            raise ModelLoadError(
                f"{self.path}: the GGUF file is truncated or corrupt (tensor {name!r} needs bytes "
                f"{offset}..{offset + nbytes}, the file has {self.size})"
            )
        return GGUFTensorInfo(name, shape, ggml_type, offset, nbytes)
