"""GGUF metadata: what inspect_gguf reports for files the suite writes itself, and
that hostile bytes only ever give AemError."""

from __future__ import annotations

import hashlib
import struct

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from aemd.executors.ggufmeta import (FIXED_OVERHEAD_MB, GgufInfo, check_gguf,
                                     estimate_memory_mb, inspect_gguf)
from aemd.executors.tinygguf import BENCH_MODEL, vocab_pieces, write_tiny_llama_gguf
from protocol.errors import BAD_VALUE, NOT_FOUND, AemError

N_SPECIAL_AND_BYTES = 3 + 256


def llama_params(n_layers, n_embd, n_ff, n_head, n_head_kv, n_vocab_pieces, **_):
    n_vocab = N_SPECIAL_AND_BYTES + n_vocab_pieces
    kv = n_embd // n_head * n_head_kv
    per_layer = 2 * n_embd + n_embd * n_embd * 2 + 2 * kv * n_embd + 3 * n_ff * n_embd
    return 2 * n_vocab * n_embd + n_embd + n_layers * per_layer


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    d = tmp_path_factory.mktemp("gguf")
    return {dt: write_tiny_llama_gguf(d / f"tiny-{dt}.gguf", dtype=dt, seed=1)
            for dt in ("F32", "F16", "Q8_0")}


@pytest.mark.parametrize("dtype,file_type", [("F32", 0), ("F16", 1), ("Q8_0", 7)])
def test_inspect_tiny(models, dtype, file_type):
    path = models[dtype]
    info = inspect_gguf(path)
    assert isinstance(info, GgufInfo)
    assert info.architecture == "llama"
    assert info.quantization == dtype
    assert info.file_type == file_type
    assert (info.context_length, info.block_count, info.embedding_length) == (512, 2, 64)
    assert (info.head_count, info.head_count_kv, info.head_dim) == (4, 4, 16)
    assert info.n_vocab == N_SPECIAL_AND_BYTES + 200
    assert info.n_params == llama_params(2, 64, 128, 4, 4, 200)
    assert info.n_tensors == 3 + 9 * 2
    data = path.read_bytes()
    assert info.size_bytes == len(data)
    assert 0 < info.tensor_bytes < info.size_bytes
    assert info.content_hash == hashlib.sha256(data).digest()
    assert check_gguf(path) == len(data)


def test_sizes_follow_the_type(models):
    sizes = {dt: inspect_gguf(p).tensor_bytes for dt, p in models.items()}
    assert sizes["Q8_0"] < sizes["F16"] < sizes["F32"]


def test_writer_is_deterministic(tmp_path):
    a = write_tiny_llama_gguf(tmp_path / "a.gguf", seed=7, dtype="Q8_0")
    b = write_tiny_llama_gguf(tmp_path / "b.gguf", seed=7, dtype="Q8_0")
    c = write_tiny_llama_gguf(tmp_path / "c.gguf", seed=8, dtype="Q8_0")
    assert a.read_bytes() == b.read_bytes()
    assert a.read_bytes() != c.read_bytes()


def test_gqa_and_bench_shapes(tmp_path):
    p = write_tiny_llama_gguf(tmp_path / "gqa.gguf", n_head=4, n_head_kv=2, n_layers=1)
    info = inspect_gguf(p)
    assert (info.head_count, info.head_count_kv, info.head_dim) == (4, 2, 16)
    assert info.n_params == llama_params(1, 64, 128, 4, 2, 200)
    # the benchmark model: ~47M parameters, vocabulary of 8000 (not written here)
    assert 40e6 < llama_params(**BENCH_MODEL) < 60e6
    pieces = vocab_pieces(BENCH_MODEL["n_vocab_pieces"])
    assert len(pieces) == len(set(pieces)) == 8000 - N_SPECIAL_AND_BYTES


def test_bad_writer_arguments(tmp_path):
    with pytest.raises(AemError) as e:
        write_tiny_llama_gguf(tmp_path / "x.gguf", dtype="Q4_K")
    assert e.value.code == BAD_VALUE
    with pytest.raises(AemError):
        write_tiny_llama_gguf(tmp_path / "x.gguf", n_embd=48, dtype="Q8_0")
    assert not (tmp_path / "x.gguf").exists()


def test_estimate_memory(models):
    info = inspect_gguf(models["F16"])
    kv = 2 * 2 * 1024 * 4 * 16 * 2
    want = -(-(info.tensor_bytes + kv + FIXED_OVERHEAD_MB * 2**20) // 2**20)
    assert estimate_memory_mb(info, 1024) == want
    assert estimate_memory_mb(info, 4096) > estimate_memory_mb(info, 1024)
    with pytest.raises(AemError):
        estimate_memory_mb(info, 0)


def test_missing_file(tmp_path):
    with pytest.raises(AemError) as e:
        inspect_gguf(tmp_path / "nope.gguf")
    assert e.value.code == NOT_FOUND


def expect_bad(path):
    with pytest.raises(AemError) as e:
        inspect_gguf(path)
    assert e.value.code == BAD_VALUE


def test_empty_and_not_gguf(tmp_path):
    p = tmp_path / "x.gguf"
    for data in (b"", b"GGUF", b"GGML" + bytes(100), b"GGUF" + struct.pack("<I", 99) + bytes(16)):
        p.write_bytes(data)
        expect_bad(p)


def test_huge_array_count_is_refused_quickly(tmp_path):
    # one key whose array claims 2**62 uint8 items: GGUFReader alone would spin on it
    key = b"general.junk"
    body = (b"GGUF" + struct.pack("<IQQ", 3, 0, 1) + struct.pack("<Q", len(key)) + key
            + struct.pack("<IIQ", 9, 0, 2**62))
    p = tmp_path / "huge.gguf"
    p.write_bytes(body + bytes(64))
    expect_bad(p)


def test_truncated_files(models, tmp_path):
    data = models["Q8_0"].read_bytes()
    p = tmp_path / "t.gguf"
    # the file ends with up to 31 bytes of padding after the last tensor
    for n in (8, 24, 100, 1000, 5000, len(data) // 2, len(data) - 40):
        p.write_bytes(data[:n])
        expect_bad(p)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.binary(max_size=512), st.booleans())
def test_random_bytes_only_give_aem_error(tmp_path, data, with_magic):
    p = tmp_path / "r.gguf"
    p.write_bytes((b"GGUF\x03\x00\x00\x00" if with_magic else b"") + data)
    expect_bad(p)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.data())
def test_mutated_real_file_never_raises_other_errors(models, tmp_path, data):
    orig = bytearray(models["F16"].read_bytes())
    header_end = 24 + 20000                      # metadata: keys, vocabulary, tensor infos
    for _ in range(data.draw(st.integers(1, 8))):
        i = data.draw(st.integers(4, min(header_end, len(orig) - 1)))
        orig[i] = data.draw(st.integers(0, 255))
    p = tmp_path / "m.gguf"
    p.write_bytes(bytes(orig[:data.draw(st.integers(24, len(orig)))]))
    try:
        inspect_gguf(p)
    except AemError as e:
        assert e.code == BAD_VALUE
