"""Write real, loadable llama-architecture GGUF files with random weights.

Tests, ``aemd demo`` and the benchmarks need a model that goes through the real
loading path of llama.cpp without downloading anything. :func:`write_tiny_llama_gguf`
writes one with ``gguf.GGUFWriter``:

- architecture ``llama`` with the hyper-parameters given as arguments;
- a SentencePiece-style vocabulary (tokenizer model ``llama``): ``<unk>``, ``<s>``,
  ``</s>``, the 256 byte tokens ``<0x00>``..``<0xFF>`` (so any text can be tokenised),
  then text pieces: ``▁``, letters, digits, punctuation, and common short words with
  and without the ``▁`` word prefix, each with all its prefixes so SentencePiece
  merges can reach it, then synthetic pieces up to the requested count;
- weights drawn from ``numpy.random.default_rng(seed)``: the same arguments always
  give the same bytes;
- ``dtype`` ``F32``, ``F16`` or ``Q8_0``. One-dimensional tensors (the RMS norms)
  stay F32 as llama.cpp expects; Q8_0 tensors are quantised with
  ``gguf.quants.quantize``.

:data:`BENCH_MODEL` holds the arguments of a ~47M-parameter model that is large
enough for generation to dominate a benchmark's timings.
"""

from __future__ import annotations

import os
import string
from pathlib import Path

from protocol.errors import BAD_VALUE, AemError

__all__ = ["write_tiny_llama_gguf", "BENCH_MODEL", "TINY_MODEL", "vocab_pieces"]

TINY_MODEL = dict(n_layers=2, n_embd=64, n_ff=128, n_head=4, n_head_kv=4,
                  n_vocab_pieces=200, context_length=512)
BENCH_MODEL = dict(n_layers=12, n_embd=512, n_ff=1408, n_head=8, n_head_kv=8,
                   n_vocab_pieces=7741, context_length=2048)   # vocab 8000, ~47M params

SPACE = "\u2581"        # "▁", SentencePiece's word-start marker
N_SPECIAL = 3           # <unk>, <s>, </s>
N_BYTE = 256
MAX_PIECES = 1 << 17

_WORDS = (
    "the of and to in is it you that he was for on are as with his they at be this "
    "have from or one had by word but not what all were we when your can said there "
    "use an each which she do how their if will up other about out many then them "
    "these so some her would make like him into time has look two more write go see "
    "number no way could people my than first water been call who oil its now find "
    "long down day did get come made may part hello world code test patch model"
).split()

# llama_ftype values (gguf.LlamaFileType)
_FILE_TYPES = {"F32": 0, "F16": 1, "Q8_0": 7}


def vocab_pieces(n_pieces: int) -> list[str]:
    """The ``n_pieces`` text pieces that follow the special and byte tokens.

    Deterministic: single characters first, then words with all their prefixes, then
    two- and three-letter synthetic pieces until the count is reached."""
    out: list[str] = []
    seen: set[str] = set()

    def add(p: str) -> None:
        if p not in seen:
            seen.add(p)
            out.append(p)

    add(SPACE)
    for c in string.ascii_lowercase + string.ascii_uppercase + string.digits + ".,!?;:'-()\"":
        add(c)
    for c in string.ascii_lowercase:
        add(SPACE + c)
    for w in _WORDS:
        for i in range(2, len(w) + 1):
            add(w[:i])
            add(SPACE + w[:i])
    letters = string.ascii_lowercase
    for a in letters:
        for b in letters:
            add(a + b)
            add(SPACE + a + b)
    for a in letters:
        for b in letters:
            for c in letters:
                add(a + b + c)
                add(SPACE + a + b + c)
                if len(out) >= n_pieces:
                    return out[:n_pieces]
    return out[:n_pieces]


def write_tiny_llama_gguf(
    path: str | os.PathLike[str],
    *,
    seed: int = 0,
    n_layers: int = 2,
    n_embd: int = 64,
    n_ff: int = 128,
    n_head: int = 4,
    n_head_kv: int = 4,
    n_vocab_pieces: int = 200,
    context_length: int = 512,
    dtype: str = "F32",
    chat_template: str | None = None,
    eos_token_id: int = 2,
) -> Path:
    """Write a llama GGUF with random weights to ``path`` (atomically) and return it.

    The vocabulary has ``3 + 256 + n_vocab_pieces`` tokens. ``n_embd`` must be a
    multiple of ``n_head`` and, for Q8_0, ``n_embd`` and ``n_ff`` multiples of 32.
    ``chat_template`` is written as ``tokenizer.chat_template`` when given;
    ``eos_token_id`` may name another token as EOS (a test of stop strings)."""
    import numpy as np
    import gguf
    from gguf import GGMLQuantizationType, GGUFWriter, MODEL_TENSOR, TENSOR_NAMES, TokenType

    if dtype not in _FILE_TYPES:
        raise AemError(BAD_VALUE, f"dtype must be one of {sorted(_FILE_TYPES)}, not {dtype!r}")
    for name, v in (("n_layers", n_layers), ("n_embd", n_embd), ("n_ff", n_ff),
                    ("n_head", n_head), ("n_head_kv", n_head_kv),
                    ("context_length", context_length)):
        if not isinstance(v, int) or v <= 0:
            raise AemError(BAD_VALUE, f"{name} must be a positive integer")
    if not isinstance(n_vocab_pieces, int) or not 0 <= n_vocab_pieces <= MAX_PIECES:
        raise AemError(BAD_VALUE, f"n_vocab_pieces must be in 0..{MAX_PIECES}")
    if n_embd % n_head or n_head % n_head_kv or (n_embd // n_head) % 2:
        raise AemError(BAD_VALUE, "n_embd/n_head must be even and n_head a multiple of n_head_kv")
    if dtype == "Q8_0" and (n_embd % 32 or n_ff % 32):
        raise AemError(BAD_VALUE, "Q8_0 needs n_embd and n_ff to be multiples of 32")

    pieces = vocab_pieces(n_vocab_pieces)
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(N_BYTE)] + pieces
    types = ([TokenType.UNKNOWN, TokenType.CONTROL, TokenType.CONTROL]
             + [TokenType.BYTE] * N_BYTE + [TokenType.NORMAL] * len(pieces))
    # SentencePiece merges the pair whose result has the highest score: longer pieces
    # first, earlier pieces first among equals.
    scores = [0.0] * (N_SPECIAL + N_BYTE) + [
        float(len(p)) - i / (len(pieces) + 1) for i, p in enumerate(pieces)]
    n_vocab = len(tokens)
    head_dim = n_embd // n_head
    n_embd_kv = head_dim * n_head_kv

    rng = np.random.default_rng(seed)
    qtype = {"F32": GGMLQuantizationType.F32, "F16": GGMLQuantizationType.F16,
             "Q8_0": GGMLQuantizationType.Q8_0}[dtype]

    def matrix(rows: int, cols: int) -> np.ndarray:
        return rng.standard_normal((rows, cols), dtype=np.float32) * np.float32(cols ** -0.5)

    def norm() -> np.ndarray:
        return (1.0 + 0.1 * rng.standard_normal(n_embd, dtype=np.float32)).astype(np.float32)

    path = Path(path)
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    w = GGUFWriter(tmp, "llama")
    w.add_name(f"aem-tiny-llama-{n_layers}x{n_embd}-{dtype}-seed{seed}")
    w.add_context_length(context_length)
    w.add_embedding_length(n_embd)
    w.add_block_count(n_layers)
    w.add_feed_forward_length(n_ff)
    w.add_head_count(n_head)
    w.add_head_count_kv(n_head_kv)
    w.add_rope_dimension_count(head_dim)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_vocab_size(n_vocab)
    w.add_file_type(_FILE_TYPES[dtype])
    w.add_tokenizer_model("llama")
    w.add_token_list(tokens)
    w.add_token_scores(scores)
    w.add_token_types(types)
    w.add_unk_token_id(0)
    w.add_bos_token_id(1)
    w.add_eos_token_id(eos_token_id)
    w.add_add_bos_token(True)
    w.add_add_eos_token(False)
    if chat_template is not None:
        w.add_chat_template(chat_template)

    def put(kind, array: np.ndarray, bid: int | None = None) -> None:
        name = TENSOR_NAMES[kind] + ".weight"
        if bid is not None:
            name = name.format(bid=bid)
        if array.ndim == 1 or qtype == GGMLQuantizationType.F32:
            w.add_tensor(name, array.astype(np.float32))
        elif qtype == GGMLQuantizationType.F16:
            w.add_tensor(name, array.astype(np.float16))
        else:
            w.add_tensor(name, gguf.quants.quantize(array, qtype), raw_dtype=qtype)

    put(MODEL_TENSOR.TOKEN_EMBD, matrix(n_vocab, n_embd))
    for i in range(n_layers):
        put(MODEL_TENSOR.ATTN_NORM, norm(), i)
        put(MODEL_TENSOR.ATTN_Q, matrix(n_embd, n_embd), i)
        put(MODEL_TENSOR.ATTN_K, matrix(n_embd_kv, n_embd), i)
        put(MODEL_TENSOR.ATTN_V, matrix(n_embd_kv, n_embd), i)
        put(MODEL_TENSOR.ATTN_OUT, matrix(n_embd, n_embd), i)
        put(MODEL_TENSOR.FFN_NORM, norm(), i)
        put(MODEL_TENSOR.FFN_GATE, matrix(n_ff, n_embd), i)
        put(MODEL_TENSOR.FFN_UP, matrix(n_ff, n_embd), i)
        put(MODEL_TENSOR.FFN_DOWN, matrix(n_embd, n_ff), i)
    put(MODEL_TENSOR.OUTPUT_NORM, norm())
    put(MODEL_TENSOR.OUTPUT, matrix(n_vocab, n_embd))
    try:
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
        os.replace(tmp, path)
    except BaseException:
        w.close()
        tmp.unlink(missing_ok=True)
        raise
    return path
