"""Read what a GGUF capsule is, without loading it.

:func:`inspect_gguf` answers the questions the node asks before it offers a model:
which architecture, how many parameters, which quantisation, how long a context,
how many bytes of weights, and the SHA-256 of the file (the capsule's content hash).
:func:`estimate_memory_mb` turns that into the memory a loaded model needs, which is
what the node's concurrency limit and its HostAdvertisement are built from.

A GGUF file can come from a stranger, so it is parsed in two passes:

1. :func:`_scan` walks the header, the key/value section and the tensor-info section
   with explicit bounds checks: every count and every length must fit in the bytes
   that remain, nesting is limited, and every tensor's data must lie inside the file.
   This pass exists because ``gguf.GGUFReader`` slices a memory map and does not
   check lengths: an array header claiming 2**63 one-byte items past the end of the
   file makes it loop (and allocate) practically forever instead of failing.
2. ``gguf.GGUFReader`` then reads the (now known to be well-formed) file, and the
   values are taken from its fields.

Any failure in either pass, whatever its Python type, becomes
``AemError(BAD_VALUE, ...)``: a hostile or truncated file never raises anything else.
"""

from __future__ import annotations

import hashlib
import mmap
import os
import struct
from dataclasses import dataclass

from protocol.errors import BAD_VALUE, NOT_FOUND, AemError

__all__ = ["GgufInfo", "check_gguf", "inspect_gguf", "estimate_memory_mb", "sha256_file"]

HASH_CHUNK = 1 << 20                 # the content hash streams the file in 1 MiB reads
GGUF_MAGIC = b"GGUF"
SUPPORTED_VERSIONS = (2, 3)
MAX_KV = 1 << 16                     # key/value pairs in one file
MAX_TENSORS = 1 << 20
MAX_KEY_LEN = 1 << 16
MAX_ARRAY_DEPTH = 2                  # an array of arrays, no deeper
MAX_DIMS = 4                         # GGML_MAX_DIMS
KV_OVERHEAD_BYTES = 2                # KV cache is F16: two bytes per element
FIXED_OVERHEAD_MB = 64               # compute buffers, scratch, runtime


@dataclass(frozen=True)
class GgufInfo:
    """What a GGUF file declares about itself (all sizes in bytes)."""

    architecture: str
    n_params: int                    # sum of the element counts of all tensors
    quantization: str                # dominant tensor type by elements: "F16", "Q8_0", "Q4_K"
    file_type: int | None            # general.file_type (llama_ftype), when present
    context_length: int | None       # trained context length
    block_count: int | None          # layers
    embedding_length: int | None
    head_count: int | None
    head_count_kv: int | None        # defaults to head_count when absent
    head_dim: int | None             # key_length if present, else embedding/heads
    n_vocab: int | None              # entries in tokenizer.ggml.tokens
    n_tensors: int
    tensor_bytes: int                # on-disk bytes of all tensor data
    size_bytes: int                  # size of the file
    content_hash: bytes              # SHA-256 of the file


# --- pass 1: bounds-checked scan ---------------------------------------------------

# GGUF value types: id -> fixed size in bytes (None for STRING and ARRAY).
_VT_SIZES = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}
_VT_STRING = 8
_VT_ARRAY = 9


class _Bad(Exception):
    """Internal: the scan found a malformed file."""


class _Cursor:
    def __init__(self, buf: memoryview, order: str) -> None:
        self.buf = buf
        self.pos = 0
        self.order = order

    def need(self, n: int) -> None:
        if n < 0 or self.pos + n > len(self.buf):
            raise _Bad(f"truncated at offset {self.pos} (needs {n} bytes)")

    def u32(self) -> int:
        self.need(4)
        (v,) = struct.unpack_from(self.order + "I", self.buf, self.pos)
        self.pos += 4
        return v

    def u64(self) -> int:
        self.need(8)
        (v,) = struct.unpack_from(self.order + "Q", self.buf, self.pos)
        self.pos += 8
        return v

    def string(self, limit: int | None = None) -> bytes:
        n = self.u64()
        if limit is not None and n > limit:
            raise _Bad(f"string of {n} bytes at offset {self.pos}")
        self.need(n)
        s = bytes(self.buf[self.pos:self.pos + n])
        self.pos += n
        return s

    def skip_value(self, vtype: int, depth: int = 0) -> None:
        if vtype in _VT_SIZES:
            self.need(_VT_SIZES[vtype])
            self.pos += _VT_SIZES[vtype]
        elif vtype == _VT_STRING:
            n = self.u64()
            self.need(n)
            self.pos += n
        elif vtype == _VT_ARRAY:
            if depth >= MAX_ARRAY_DEPTH:
                raise _Bad("arrays nested too deep")
            itype = self.u32()
            count = self.u64()
            if itype in _VT_SIZES:
                self.need(count * _VT_SIZES[itype])
                self.pos += count * _VT_SIZES[itype]
            elif itype in (_VT_STRING, _VT_ARRAY):
                # every item takes at least 8 bytes, so the count is bounded by the file
                self.need(count * 8)
                for _ in range(count):
                    self.skip_value(itype, depth + 1)
            else:
                raise _Bad(f"unknown array item type {itype}")
        else:
            raise _Bad(f"unknown value type {vtype}")


def _scan(buf: memoryview, size: int) -> None:
    """Check that the whole metadata section of a GGUF file is well formed."""
    from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

    if len(buf) < 24 or bytes(buf[:4]) != GGUF_MAGIC:
        raise _Bad("not a GGUF file (magic)")
    order = "<"
    (version,) = struct.unpack_from("<I", buf, 4)
    if version & 0xFFFF == 0:                    # written on the other byte order
        order = ">"
        (version,) = struct.unpack_from(">I", buf, 4)
    if version not in SUPPORTED_VERSIONS:
        raise _Bad(f"unsupported GGUF version {version}")
    cur = _Cursor(buf, order)
    cur.pos = 8
    n_tensors = cur.u64()
    n_kv = cur.u64()
    if n_kv > MAX_KV or n_tensors > MAX_TENSORS:
        raise _Bad(f"{n_kv} keys / {n_tensors} tensors is beyond the limits")
    alignment = 32
    keys: set[bytes] = set()
    for _ in range(n_kv):
        key = cur.string(MAX_KEY_LEN)
        if key in keys:
            raise _Bad(f"duplicate key {key[:64]!r}")
        keys.add(key)
        key.decode("utf-8")
        vtype = cur.u32()
        if key == b"general.alignment":
            if vtype != 4:
                raise _Bad("general.alignment is not a uint32")
            start = cur.pos
            alignment = cur.u32()
            cur.pos = start
            if alignment == 0 or alignment & (alignment - 1):
                raise _Bad("alignment is not a power of two")
        cur.skip_value(vtype)
    tensors = []
    names: set[bytes] = set()
    for _ in range(n_tensors):
        name = cur.string(MAX_KEY_LEN)
        if name in names:
            raise _Bad(f"duplicate tensor {name[:64]!r}")
        names.add(name)
        name.decode("utf-8")
        n_dims = cur.u32()
        if not 1 <= n_dims <= MAX_DIMS:
            raise _Bad(f"tensor with {n_dims} dimensions")
        n_elems = 1
        dims = [cur.u64() for _ in range(n_dims)]
        for d in dims:
            n_elems *= d
        ttype = cur.u32()
        try:
            qtype = GGMLQuantizationType(ttype)
            block, type_size = GGML_QUANT_SIZES[qtype]
        except (ValueError, KeyError):
            raise _Bad(f"unknown tensor type {ttype}") from None
        if dims[0] % block:
            raise _Bad("tensor row is not a whole number of blocks")
        offset = cur.u64()
        if offset % alignment:
            raise _Bad("tensor data is not aligned")
        tensors.append((offset, n_elems // block * type_size))
    data_start = -(-cur.pos // alignment) * alignment
    for offset, nbytes in tensors:
        if data_start + offset + nbytes > size:
            raise _Bad("tensor data lies beyond the end of the file")


# --- pass 2: GGUFReader ---------------------------------------------------------------

def _scalar(reader, key: str) -> int | str | None:
    field = reader.fields.get(key)
    if field is None:
        return None
    value = field.contents()
    if isinstance(value, list):                 # per-layer values: take the largest
        value = max(value) if value else None
    if isinstance(value, bool) or (value is not None and not isinstance(value, (int, str))):
        raise _Bad(f"{key} has an unexpected type")
    return value


def _int(reader, key: str) -> int | None:
    value = _scalar(reader, key)
    if value is None:
        return None
    if not isinstance(value, int) or value < 0:
        raise _Bad(f"{key} is not a non-negative integer")
    return value


def sha256_file(path: str | os.PathLike[str]) -> bytes:
    """SHA-256 of a file, streamed in 1 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(HASH_CHUNK):
            h.update(chunk)
    return h.digest()


def check_gguf(path: str | os.PathLike[str]) -> int:
    """Only the bounds-checked scan (fast: no GGUFReader, no hash): raises
    ``AemError(BAD_VALUE)`` unless the file's metadata is well formed, and
    ``AemError(NOT_FOUND)`` when it cannot be opened. Returns the file size."""
    path = os.fspath(path)
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError as e:
        raise AemError(NOT_FOUND, f"cannot open {path}: {e.strerror}") from None
    try:
        size = os.fstat(fd).st_size
        if size < 24:
            raise AemError(BAD_VALUE, f"{path}: not a GGUF file ({size} bytes)")
        with mmap.mmap(fd, 0, access=mmap.ACCESS_READ) as mm:
            with memoryview(mm) as buf:
                try:
                    _scan(buf, size)
                except (_Bad, UnicodeDecodeError) as e:
                    raise AemError(BAD_VALUE, f"{path}: malformed GGUF: {e}") from None
    finally:
        os.close(fd)
    return size


def inspect_gguf(path: str | os.PathLike[str]) -> GgufInfo:
    """Describe a GGUF file. Raises ``AemError(BAD_VALUE)`` for anything malformed and
    ``AemError(NOT_FOUND)`` when the file cannot be opened."""
    path = os.fspath(path)
    size = check_gguf(path)
    try:
        info = _read(path, size)
    except AemError:
        raise
    except Exception as e:  # noqa: BLE001 - a hostile file must only ever give BAD_VALUE
        raise AemError(BAD_VALUE, f"{path}: malformed GGUF: {type(e).__name__}: {e}") from None
    return info


def _read(path: str, size: int) -> GgufInfo:
    from gguf import GGUFReader

    reader = GGUFReader(path)
    arch = _scalar(reader, "general.architecture")
    if not isinstance(arch, str) or not arch:
        raise _Bad("general.architecture is missing")
    n_params = 0
    tensor_bytes = 0
    by_type: dict[str, int] = {}
    for t in reader.tensors:
        n_params += int(t.n_elements)
        tensor_bytes += int(t.n_bytes)
        if int(t.data.nbytes) != int(t.n_bytes):
            raise _Bad(f"tensor {t.name} is truncated")
        name = t.tensor_type.name
        by_type[name] = by_type.get(name, 0) + int(t.n_elements)
    # the dominant type by elements; ties go to the alphabetically first name
    quant = min(by_type.items(), key=lambda kv: (-kv[1], kv[0]))[0] if by_type else "NONE"
    heads = _int(reader, f"{arch}.attention.head_count")
    heads_kv = _int(reader, f"{arch}.attention.head_count_kv")
    if heads_kv is None:
        heads_kv = heads
    embd = _int(reader, f"{arch}.embedding_length")
    head_dim = _int(reader, f"{arch}.attention.key_length")
    if head_dim is None and embd and heads:
        head_dim = embd // heads
    tokens = reader.fields.get("tokenizer.ggml.tokens")
    n_vocab = len(tokens.data) if tokens is not None else None
    return GgufInfo(
        architecture=arch,
        n_params=n_params,
        quantization=quant,
        file_type=_int(reader, "general.file_type"),
        context_length=_int(reader, f"{arch}.context_length"),
        block_count=_int(reader, f"{arch}.block_count"),
        embedding_length=embd,
        head_count=heads,
        head_count_kv=heads_kv,
        head_dim=head_dim,
        n_vocab=n_vocab,
        n_tensors=len(reader.tensors),
        tensor_bytes=tensor_bytes,
        size_bytes=size,
        content_hash=sha256_file(path),
    )


def estimate_memory_mb(info: GgufInfo, n_ctx: int) -> int:
    """Memory in MiB that the model needs loaded with a context of ``n_ctx`` tokens:
    weights + F16 KV cache (2 x layers x n_ctx x kv_heads x head_dim x 2 bytes) + a
    fixed overhead of ``FIXED_OVERHEAD_MB``, rounded up to a whole MiB."""
    if not isinstance(n_ctx, int) or n_ctx <= 0:
        raise AemError(BAD_VALUE, f"n_ctx must be a positive integer, not {n_ctx!r}")
    kv = 0
    if info.block_count and info.head_count_kv and info.head_dim:
        kv = 2 * info.block_count * n_ctx * info.head_count_kv * info.head_dim * KV_OVERHEAD_BYTES
    total = info.tensor_bytes + kv + FIXED_OVERHEAD_MB * (1 << 20)
    return -(-total // (1 << 20))
