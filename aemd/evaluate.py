"""Measure a GGUF capsule for admission: the figures of gates 1-4 and 7.

:func:`evaluate_gguf` loads the model once and runs three eval sets on it (the
domain's target set, the general set and the probe set, see
``specs/admission-evals.md``), then returns :class:`GgufFigures`. The lead's pure
``protocol.admission.judge`` decides the gates from those figures; nothing here
judges.

Reproducibility (gate 7) is the design constraint: two verifiers on two machines
must get the same figures, bit for bit, so every choice that could differ is fixed
here rather than taken from the verifier's config:

- decoding is greedy (``temperature_milli`` 0) with seed ``SEED``; the KV cache is
  reset before every item (``LlamaExecutor`` does it), so no item sees another;
- the context is ``N_CTX`` tokens whatever the verifier's own serving config says,
  and ``memory_mb`` is estimated from the GGUF's metadata for that same context;
- the model runs on the CPU (``n_gpu_layers`` 0): GPU kernels reduce in other orders
  and would give other last bits, which greedy decoding can turn into other tokens;
- a prompt is sent as one user chat message, rendered by the model's own template
  (``tokenizer.chat_template``), when the file has one, and as a raw completion prompt
  when it has none: the file decides, not the verifier;
- an item the model cannot run (its prompt does not fit the context with this
  model's tokenizer, or its chat template refuses it) counts as answered with no
  output and wrong: a capsule cannot escape measurement by failing on an item, and
  every verifier records the same thing;
- the thread count does not change llama.cpp's CPU results (measured: 1, 2 and 4
  threads give identical outputs on SmolLM2 and the tiny models; tests check 1 vs 2),
  so ``n_threads`` is only a speed setting.

:func:`load_evalset` finds a set by name or content hash among the sets shipped in
``aemd/evalsets/`` and any extra directories.
"""

from __future__ import annotations

import functools
import os
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

from crypto.hashing import H
from protocol.errors import BAD_VALUE, NOT_FOUND, TIMEOUT, TOO_LARGE, WRONG_OBJECT, AemError
from protocol.evalset import (MAX_EVALSET_BYTES, EvalSet, ItemResult, fingerprint, parse_evalset,
                              results_hash, score, score_bp, trigger_divergence_bp,
                              triggered_prompt)

from .executors.ggufhash import tensor_data_hash
from .executors.ggufmeta import estimate_memory_mb, inspect_gguf

__all__ = ["GgufFigures", "evaluate_gguf", "static_figures", "load_evalset", "shipped_evalsets",
           "SHIPPED_DIR", "N_CTX", "SEED", "generations"]

N_CTX = 512          # the context every verifier measures with (and estimates memory for)
SEED = 0
SHIPPED_DIR = Path(__file__).resolve().parent / "evalsets"

Progress = Callable[[int, int], None]        # (generations done, generations in all)


@dataclass(frozen=True)
class GgufFigures:
    tensor_hash: bytes               # aemd.executors.ggufhash.tensor_data_hash
    memory_mb: int                   # estimate_memory_mb(inspect_gguf(path), N_CTX)
    target_bp: int
    general_bp: int                  # 0 without a general set
    trigger_divergence_bp: int       # 0 without a probe set
    fingerprint: bytes               # 4 bytes per probe (clean prompts); empty without a probe set
    results_hash: bytes              # protocol.evalset.results_hash(items)
    items: tuple[ItemResult, ...]    # every generation, in measurement order


def generations(target: EvalSet, general: EvalSet | None, probes: EvalSet | None) -> int:
    """How many generations one measurement runs."""
    return (len(target.items) + (len(general.items) if general else 0)
            + (len(probes.items) * (1 + len(probes.triggers)) if probes else 0))


def static_figures(path: str | os.PathLike[str]) -> tuple[int, bytes]:
    """``(memory_mb, tensor_hash)``: the figures read from the file without loading
    the model (the fits gate is judged on them before anything runs)."""
    path = os.fspath(path)
    return estimate_memory_mb(inspect_gguf(path), N_CTX), tensor_data_hash(path)


def evaluate_gguf(
    path: str | os.PathLike[str],
    *,
    target: EvalSet,
    general: EvalSet | None,
    probes: EvalSet | None,
    n_threads: int | None = None,
    on_progress: Progress | None = None,
    cancel: threading.Event | None = None,
) -> GgufFigures:
    """Measure the GGUF at ``path`` (blocking: seconds for a small model; run it in a
    worker thread). ``on_progress(done, total)`` is called after each generation.
    Without a general set ``general_bp`` is 0; without a probe set the trigger
    divergence is 0 and the fingerprint empty (the genesis names no such set).
    Setting ``cancel`` stops the measurement at the next token with
    ``AemError(TIMEOUT)``: a cut-short output must never become a figure."""
    from .executors.llama import LlamaExecutor

    for role, s, kind in (("target", target, "qa"), ("general", general, "qa"),
                          ("probes", probes, "probes")):
        if s is None and role != "target":
            continue
        if not isinstance(s, EvalSet) or s.kind != kind:
            raise AemError(BAD_VALUE, f"the {role} set must be an eval set of kind {kind}")
    memory_mb, tensor_hash = static_figures(path)
    total = generations(target, general, probes)
    done = 0
    items: list[ItemResult] = []

    with LlamaExecutor(path, n_ctx=N_CTX, n_threads=n_threads, n_gpu_layers=0, seed=SEED) as ex:
        chat = ex.chat_template is not None

        def run(s: EvalSet, index: int, trigger: int) -> tuple[bytes, bool]:
            nonlocal done
            item = s.items[index]
            prompt = item.prompt if trigger == 0 else triggered_prompt(item.prompt, s.triggers[trigger - 1])
            try:
                if chat:
                    r = ex.chat([{"role": "user", "content": prompt}], s.max_tokens, SEED, 0,
                                cancel=cancel)
                else:
                    r = ex.generate(prompt, s.max_tokens, SEED, 0, cancel=cancel)
                if r.finish_reason == "cancelled" or (cancel is not None and cancel.is_set()):
                    raise AemError(TIMEOUT, "the measurement was cancelled")
                out, ok = r.output_bytes, score(s.scorer, r.text, item.answer)
            except AemError as e:
                if e.code not in (TOO_LARGE, BAD_VALUE):
                    raise
                out, ok = b"", False
            items.append(ItemResult(eval=s.hash, item=index, trigger=trigger,
                                    output_hash=H(out), correct=ok))
            done += 1
            if on_progress is not None:
                on_progress(done, total)
            return out, ok

        target_ok = [run(target, i, 0)[1] for i in range(len(target.items))]
        general_ok = [run(general, i, 0)[1] for i in range(len(general.items))] if general else []
        clean_out, clean_ok, triggered_ok = [], [], []
        for i in range(len(probes.items) if probes else 0):
            out, ok = run(probes, i, 0)
            clean_out.append(out)
            clean_ok.append(ok)
            triggered_ok.append([run(probes, i, k)[1] for k in range(1, len(probes.triggers) + 1)])

    return GgufFigures(
        tensor_hash=tensor_hash,
        memory_mb=memory_mb,
        target_bp=score_bp(target_ok),
        general_bp=score_bp(general_ok) if general else 0,
        trigger_divergence_bp=trigger_divergence_bp(clean_ok, triggered_ok) if probes else 0,
        fingerprint=fingerprint(clean_out) if probes else b"",
        results_hash=results_hash(items),
        items=tuple(items),
    )


# --- finding eval sets ------------------------------------------------------------------

def _read_set(path: Path) -> EvalSet:
    with open(path, "rb") as f:
        data = f.read(MAX_EVALSET_BYTES + 1)     # parse_evalset refuses the extra byte
    return parse_evalset(data)


def _sets_in(d: Path) -> Iterable[EvalSet | None]:
    try:
        files = sorted(p for p in d.iterdir() if p.suffix == ".json" and p.is_file())
    except OSError:
        return
    for p in files:
        try:
            yield _read_set(p)
        except (AemError, OSError):
            yield None


@functools.lru_cache(maxsize=1)
def shipped_evalsets() -> tuple[EvalSet, ...]:
    """The eval sets shipped in ``aemd/evalsets/``, by file name. The directory also
    holds files of other formats (the code-patch fixtures), which are skipped; a
    shipped eval set that does not parse is a bug and raises."""
    out = []
    for p in sorted(SHIPPED_DIR.glob("*.json")):
        try:
            out.append(_read_set(p))
        except AemError as e:
            if e.code != WRONG_OBJECT:
                raise
    return tuple(out)


def load_evalset(hash_or_name: bytes | str, extra_dirs: Iterable[str | os.PathLike[str]] = ()) -> EvalSet:
    """The eval set with this content hash (32 bytes, or a string of 64 hex digits,
    which is always read as a hash) or this name.

    Looks in the shipped sets first, then in ``extra_dirs`` in order (``*.json``
    files; files that are not valid sets are skipped). By name, the first match in
    that order wins; by hash, any match is the same set."""
    want_hash: bytes | None = None
    if isinstance(hash_or_name, (bytes, bytearray)):
        if len(hash_or_name) != 32:
            raise AemError(BAD_VALUE, "an eval-set hash is 32 bytes")
        want_hash = bytes(hash_or_name)
    elif isinstance(hash_or_name, str):
        if len(hash_or_name) == 64:
            try:
                want_hash = bytes.fromhex(hash_or_name)
            except ValueError:
                pass
    else:
        raise AemError(BAD_VALUE, "an eval set is named by its hash or its name")

    def matches(s: EvalSet) -> bool:
        return s.hash == want_hash if want_hash is not None else s.name == hash_or_name

    for s in shipped_evalsets():
        if matches(s):
            return s
    skipped = 0
    for d in extra_dirs:
        for s in _sets_in(Path(d)):
            if s is None:
                skipped += 1
            elif matches(s):
                return s
    what = want_hash.hex() if want_hash is not None else repr(hash_or_name)
    note = f" ({skipped} unreadable files skipped)" if skipped else ""
    raise AemError(NOT_FOUND, f"no eval set {what}{note}")
