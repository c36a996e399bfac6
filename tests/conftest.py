"""Markers that split the suite by what a test needs, applied at collection.

- ``real``: starts real ``aemd``/``aemctl`` processes, real libp2p hosts or
  the code-patch sandbox (ports on 127.0.0.1, OS processes, wall-clock
  limits);
- ``model``: loads a GGUF through llama.cpp (the tiny written model or SmolLM2);
- ``sim``: runs on the deterministic mesh simulator (tests/sim registers and
  applies its own marks).

``pytest -m "not real and not model"`` is the fast set: the pure and simulated
tests, seconds on a laptop. CI runs everything (no ``-m``).

A test is marked by what its own source and the fixtures it uses (all of
them, transitively: pytest lists the closure in ``item.fixturenames``)
mention, so a new test that starts a Mesh is ``real`` without anyone
remembering to mark it. A module may add marks of its own with
``pytestmark``; nothing here removes one.
"""

from __future__ import annotations

import inspect
import re
from functools import lru_cache

import pytest

# What in a test's (or its fixtures') source means it needs the real thing.
REAL_NEEDS = re.compile(r"\b(Mesh|NodeProc|Node|open_p2p|hosts|aem_node|_run_node|a?run_code_patch)\(|\bBIN /")
MODEL_NEEDS = re.compile(r"\b(smollm2_path|llama_cpp|LlamaExecutor)\b")


@lru_cache(maxsize=None)
def _source(obj) -> str:
    try:
        return inspect.getsource(obj)
    except (OSError, TypeError):
        return ""


def _texts(item: pytest.Item) -> list[str]:
    out = []
    fn = getattr(item, "function", None)
    if fn is not None:
        out.append(_source(fn))
    info = getattr(item, "_fixtureinfo", None)
    for name in getattr(item, "fixturenames", ()):
        for fdef in (info.name2fixturedefs.get(name, ()) if info else ()):
            func = getattr(fdef, "func", None)
            if func is not None and getattr(func, "__module__", "").startswith("tests"):   # ours, not a plugin's
                out.append(_source(func))
    return out


@lru_cache(maxsize=None)
def _helpers(module, needs: re.Pattern) -> re.Pattern | None:
    """Calls of the module's own helpers that (directly or through each other) match ``needs``."""
    own = {n: _source(o) for n, o in vars(module).items()
           if (inspect.isfunction(o) or inspect.isclass(o)) and getattr(o, "__module__", "") == module.__name__
           and not n.startswith("test_")}
    hit: set[str] = set()
    while True:
        pat = re.compile(needs.pattern + ("|\\b(" + "|".join(map(re.escape, sorted(hit))) + ")\\(" if hit else ""))
        more = {n for n, src in own.items() if n not in hit and pat.search(src)}
        if not more:
            return pat if hit else None
        hit |= more


def _needs(item: pytest.Item, text: str, needs: re.Pattern) -> bool:
    if needs.search(text):
        return True
    module = getattr(item, "module", None)
    pat = _helpers(module, needs) if module is not None else None
    return bool(pat and pat.search(text))


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        text = "\n".join(_texts(item))
        if _needs(item, text, REAL_NEEDS):
            item.add_marker(pytest.mark.real)
        if _needs(item, text, MODEL_NEEDS):
            item.add_marker(pytest.mark.model)
