"""What this machine offers llama.cpp: whether the installed build can offload
layers to a GPU, the GPU's memory where it can be read, and how many layers
of a model ``[llama] n_gpu_layers = "auto"`` puts there.

Honest by construction: a build without GPU support offloads nothing, whatever
the config says (llama.cpp would silently run on the CPU); a GPU whose memory
cannot be read is "unknown", and "auto" then offloads nothing rather than guess.
"""

from __future__ import annotations

import shutil
import subprocess
from dataclasses import dataclass
from functools import lru_cache

MAX_GPUS = 16
NVIDIA_SMI_TIMEOUT_S = 5.0
RESERVE_MB = 512           # left free on the GPU: compute buffers, the driver, other programs


@dataclass(frozen=True)
class GpuInfo:
    name: str
    total_mb: int
    free_mb: int


@lru_cache(maxsize=1)
def offload_supported() -> bool | None:
    """Whether the installed llama.cpp was built with GPU offload (CUDA,
    Metal, Vulkan...); None when llama-cpp-python cannot be imported."""
    try:
        import llama_cpp
    except Exception:  # noqa: BLE001 - a broken install is "unknown", not a crash
        return None
    try:
        return bool(llama_cpp.llama_supports_gpu_offload())
    except Exception:  # noqa: BLE001
        return None


def parse_nvidia_smi(text: str) -> list[GpuInfo]:
    """Lines ``name, memory.total, memory.free`` (MiB, no units) -> GpuInfo;
    malformed lines are skipped."""
    out = []
    for line in text.splitlines()[:MAX_GPUS]:
        parts = [p.strip() for p in line.rsplit(",", 2)]
        if len(parts) != 3:
            continue
        try:
            total, free = int(float(parts[1])), int(float(parts[2]))
        except ValueError:
            continue
        if total >= 0 and 0 <= free <= max(total, free):
            out.append(GpuInfo(name=parts[0][:64], total_mb=total, free_mb=free))
    return out


def detect_gpus() -> list[GpuInfo]:
    """NVIDIA GPUs through ``nvidia-smi`` when it is installed; [] otherwise
    (Metal and others: memory unknown)."""
    exe = shutil.which("nvidia-smi")
    if exe is None:
        return []
    try:
        r = subprocess.run([exe, "--query-gpu=name,memory.total,memory.free",
                            "--format=csv,noheader,nounits"], capture_output=True, text=True,
                           timeout=NVIDIA_SMI_TIMEOUT_S, check=False)
    except (OSError, subprocess.SubprocessError):
        return []
    return parse_nvidia_smi(r.stdout) if r.returncode == 0 else []


def check_setting(value: object) -> int | str:
    """A valid ``[llama] n_gpu_layers``: an int >= -1 (-1: all layers) or "auto"."""
    if value == "auto":
        return "auto"
    if type(value) is int and value >= -1:
        return value
    raise ValueError('n_gpu_layers must be an integer >= -1 or "auto"')


def auto_layers(n_layers: int, tensor_bytes: int, free_mb: int | None, kv_mb: int = 0) -> int:
    """Layers of a model that fit in ``free_mb`` of GPU memory, keeping
    RESERVE_MB and the KV cache (``kv_mb``) aside. The weights are spread
    evenly over the layers plus one (the output layer, which llama.cpp
    offloads when every layer fits). Unknown memory offloads nothing."""
    if free_mb is None or n_layers <= 0 or tensor_bytes <= 0:
        return 0
    per_layer = tensor_bytes / (n_layers + 1)
    room = (free_mb - RESERVE_MB - kv_mb) * (1 << 20)
    if room <= 0:
        return 0
    return int(min(n_layers + 1, room // per_layer))


def resolve_layers(setting: int | str, n_layers: int | None, tensor_bytes: int,
                   supported: bool | None, free_mb: int | None, kv_mb: int = 0) -> int:
    """The ``n_gpu_layers`` to load a model with. 0 on a build without
    offload (so what is reported is what runs); "auto" by :func:`auto_layers`."""
    if not supported:
        return 0
    if setting == "auto":
        return auto_layers(n_layers or 0, tensor_bytes, free_mb, kv_mb)
    return int(setting)


def offloaded(n_gpu_layers: int, n_layers: int | None) -> int:
    """Model layers on the GPU for a load with ``n_gpu_layers`` (-1: all)."""
    if n_gpu_layers == 0 or not n_layers:
        return 0
    if n_gpu_layers < 0:
        return n_layers
    return min(n_gpu_layers, n_layers)


def summary() -> dict:
    """What `aemctl status` and `aemctl doctor` show about the GPU."""
    gpus = detect_gpus()
    return {"offload_supported": offload_supported(),
            "gpus": [{"name": g.name, "total_mb": g.total_mb, "free_mb": g.free_mb} for g in gpus]}


def model_layers(path: str) -> int | None:
    """``<arch>.block_count`` of a GGUF file (header only), None if unreadable."""
    try:
        from gguf import GGUFReader

        from aemd.executors.ggufmeta import _int, _scalar, check_gguf
        check_gguf(path)                 # bounds-checked before GGUFReader sees it
        reader = GGUFReader(path)
        arch = _scalar(reader, "general.architecture")
        return _int(reader, f"{arch}.block_count") if isinstance(arch, str) else None
    except Exception:  # noqa: BLE001 - a bad file fails later, at load, with its own error
        return None
