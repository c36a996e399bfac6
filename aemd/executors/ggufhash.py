"""The tensor hash of a GGUF file: what the model *is*, whatever its metadata says.

The duplicate gate must catch a renamed or re-labelled copy of an admitted model.
The file's SHA-256 changes with any key/value edit (``general.name``, a license
string, a new chat template), so the gate compares this hash instead:

    tensor_hash = SHA-256( canonical.encode({"format": "aem-gguf-tensors/1",
                                             "tensors": [[name, dims, type, nbytes], ...]})
                           || data(t_1) || data(t_2) || ... )

over the tensors sorted by the UTF-8 bytes of their names (so reordering the
tensor-info section changes nothing); ``dims`` are the dimensions as the file stores
them (ggml order, innermost first), ``type`` the ggml type id, ``nbytes`` the size of
the tensor's data, and ``data(t)`` exactly those bytes. The key/value section, the
alignment padding and the file's byte order markers are not hashed. The canonical
encoding is self-delimiting, so the descriptor block and the data cannot be confused.

The metadata is checked by :func:`ggufmeta.check_gguf` (bounds-checked, never trusts a
count) before this walks it again; the tensor data is read with plain reads of at
most ``HASH_CHUNK`` bytes, so a file of several GB costs 1 MiB of memory, and a
file that is shorter than its descriptors say (or shrinks while it is read) gives
``AemError(BAD_VALUE)`` rather than a crash.
"""

from __future__ import annotations

import contextlib
import hashlib
import mmap
import os
import struct

from protocol import canonical
from protocol.errors import BAD_VALUE, NOT_FOUND, AemError

from .ggufmeta import _Bad, _Cursor, check_gguf  # the one GGUF walker

__all__ = ["TENSORS_FORMAT", "HASH_CHUNK", "tensor_data_hash", "tensor_descriptors", "copy_with_metadata"]

TENSORS_FORMAT = "aem-gguf-tensors/1"
HASH_CHUNK = 1 << 20


def _walk(buf: memoryview) -> tuple[int, list[tuple[bytes, list[int], int, int, int]]]:
    """(data start, [(name, dims, type, offset, nbytes)]) of an already checked file."""
    from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

    order = "<"
    (version,) = struct.unpack_from("<I", buf, 4)
    if version & 0xFFFF == 0:
        order = ">"
    cur = _Cursor(buf, order)
    cur.pos = 8
    n_tensors = cur.u64()
    n_kv = cur.u64()
    alignment = 32
    for _ in range(n_kv):
        key = cur.string()
        vtype = cur.u32()
        if key == b"general.alignment" and vtype == 4:
            start = cur.pos
            alignment = cur.u32()
            cur.pos = start
        cur.skip_value(vtype)
    tensors = []
    for _ in range(n_tensors):
        name = cur.string()
        n_dims = cur.u32()
        dims = [cur.u64() for _ in range(n_dims)]
        ttype = cur.u32()
        block, type_size = GGML_QUANT_SIZES[GGMLQuantizationType(ttype)]
        n_elems = 1
        for d in dims:
            n_elems *= d
        offset = cur.u64()
        tensors.append((name, dims, ttype, offset, n_elems // block * type_size))
    return -(-cur.pos // alignment) * alignment, tensors


def tensor_descriptors(path: str | os.PathLike[str]) -> tuple[int, list[tuple[str, list[int], int, int, int]]]:
    """The data start and the (name, dims, type, absolute offset, nbytes) of every
    tensor, sorted by name: what :func:`tensor_data_hash` covers."""
    path = os.fspath(path)
    check_gguf(path)
    try:
        with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
            with memoryview(mm) as buf:
                start, raw = _walk(buf)
    except OSError as e:
        raise AemError(NOT_FOUND, f"cannot read {path}: {e.strerror}") from None
    except (_Bad, ValueError, KeyError, struct.error) as e:
        # check_gguf accepted the file, so only a file changed in between gets here
        raise AemError(BAD_VALUE, f"{path}: malformed GGUF: {e}") from None
    out = [(name.decode("utf-8"), dims, ttype, start + offset, nbytes)
           for name, dims, ttype, offset, nbytes in raw]
    out.sort(key=lambda t: t[0].encode("utf-8"))
    return start, out


def tensor_data_hash(path: str | os.PathLike[str]) -> bytes:
    """SHA-256 over the tensor descriptors and data of a GGUF file (32 bytes); see the
    module docstring. ``AemError(BAD_VALUE)`` for a malformed file, ``NOT_FOUND`` when
    it cannot be opened."""
    path = os.fspath(path)
    _, tensors = tensor_descriptors(path)
    h = hashlib.sha256(canonical.encode({
        "format": TENSORS_FORMAT,
        "tensors": [[name, dims, ttype, nbytes] for name, dims, ttype, _, nbytes in tensors]}))
    try:
        with open(path, "rb", buffering=0) as f:
            for name, _, _, offset, nbytes in tensors:
                f.seek(offset)
                left = nbytes
                while left:
                    chunk = f.read(min(HASH_CHUNK, left))
                    if not chunk:
                        raise AemError(BAD_VALUE, f"{path}: tensor {name[:64]} ends past the end of the file")
                    h.update(chunk)
                    left -= len(chunk)
    except OSError as e:
        raise AemError(NOT_FOUND, f"cannot read {path}: {e.strerror}") from None
    return h.digest()


def copy_with_metadata(src: str | os.PathLike[str], dst: str | os.PathLike[str],
                       strings: dict[str, str]) -> None:
    """Copy the GGUF ``src`` to ``dst`` with the string keys in ``strings`` set (added
    when absent, replaced otherwise) and everything else byte for byte: the same
    tensor hash, another file hash. This is how a renamed or re-labelled copy is made
    (the duplicate gate's adversary, and the tests'); the data section is streamed.

    Tensor offsets are relative to the start of the data section, so only the
    key/value section changes length and the padding before the data is redone."""
    src, dst = os.fspath(src), os.fspath(dst)
    check_gguf(src)
    for k, v in strings.items():
        if not isinstance(k, str) or not isinstance(v, str) or not k:
            raise AemError(BAD_VALUE, "metadata keys and values are strings")
    with open(src, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
        with memoryview(mm) as buf:
            order = ">" if struct.unpack_from("<I", buf, 4)[0] & 0xFFFF == 0 else "<"
            cur = _Cursor(buf, order)
            cur.pos = 8
            n_tensors = cur.u64()
            n_kv = cur.u64()
            records: list[bytes] = []
            alignment = 32
            todo = dict(strings)

            def string_record(key: str, value: str) -> bytes:
                kb, vb = key.encode("utf-8"), value.encode("utf-8")
                return (struct.pack(order + "Q", len(kb)) + kb + struct.pack(order + "I", 8)
                        + struct.pack(order + "Q", len(vb)) + vb)

            for _ in range(n_kv):
                start = cur.pos
                key = cur.string().decode("utf-8")
                vtype = cur.u32()
                if key == "general.alignment" and vtype == 4:
                    alignment = struct.unpack_from(order + "I", buf, cur.pos)[0]
                cur.skip_value(vtype)
                if key in todo:
                    records.append(string_record(key, todo.pop(key)))
                else:
                    records.append(bytes(buf[start:cur.pos]))
            records += [string_record(k, v) for k, v in todo.items()]
            ti_start = cur.pos
            for _ in range(n_tensors):
                cur.string()
                n_dims = cur.u32()
                cur.pos += 8 * n_dims + 4 + 8
            tensor_infos = bytes(buf[ti_start:cur.pos])
            old_data = -(-cur.pos // alignment) * alignment
            head = (bytes(buf[:8]) + struct.pack(order + "QQ", n_tensors, len(records))
                    + b"".join(records) + tensor_infos)
            head += b"\0" * (-len(head) % alignment)
            tmp = dst + f".tmp{os.getpid()}"
            try:
                with open(tmp, "wb") as out:
                    out.write(head)
                    for pos in range(old_data, len(buf), HASH_CHUNK):
                        out.write(buf[pos:min(pos + HASH_CHUNK, len(buf))])
                os.replace(tmp, dst)
            except BaseException:
                with contextlib.suppress(OSError):
                    os.unlink(tmp)
                raise
