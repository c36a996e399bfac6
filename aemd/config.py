"""The node's TOML config: documented defaults, strict loading.

``aemd init`` writes :data:`TEMPLATE` (every key, commented) to
``<home>/config.toml``. Loading fills missing keys from :data:`DEFAULTS` and
refuses unknown sections or keys and wrongly typed values with a CONFIG error
that names the key, so a typo never silently does nothing.

:func:`load_config` returns a :class:`Config`: a frozen tree of dataclasses,
one per section (``cfg.llama.n_ctx``). Each also reads as a mapping
(``cfg["llama"]["n_ctx"]``, ``dict(cfg.capacity)``) for the callers written
against the dicts this used to return, and compares equal to the same dict.
"""

from __future__ import annotations

import copy
import dataclasses
import tomllib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from protocol import errors
from protocol.errors import AemError
from protocol.task import TRAINING_DEFAULT, TRAINING_USES


class _Section(Mapping):
    """Read-only mapping view of a frozen dataclass's fields (eq as a mapping)."""

    def __getitem__(self, key: str) -> Any:
        if not isinstance(key, str) or key not in self._names():
            raise KeyError(key)
        return getattr(self, key)

    def __iter__(self) -> Iterator[str]:
        return iter(self._names())

    def __len__(self) -> int:
        return len(self._names())

    @classmethod
    def _names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in dataclasses.fields(cls))  # type: ignore[arg-type]

    def as_dict(self) -> dict[str, Any]:
        """Plain dicts and lists, the shape of the TOML file."""
        out: dict[str, Any] = {}
        for name in self._names():
            v = getattr(self, name)
            out[name] = v.as_dict() if isinstance(v, _Section) else list(v) if isinstance(v, tuple) else v
        return out


# eq=False: equality is the mapping's (a section equals the dict of its keys).
@dataclass(frozen=True, eq=False)
class NodeConfig(_Section):
    listen: tuple[str, ...] = ("/ip4/0.0.0.0/tcp/4001",)
    bootstrap: tuple[str, ...] = ()
    mdns: bool = False
    log_level: str = "info"


@dataclass(frozen=True, eq=False)
class CapacityConfig(_Section):
    gpu: str = ""
    vram_mb: int = 0
    ram_mb: int = 0
    locality: str = ""


@dataclass(frozen=True, eq=False)
class GossipConfig(_Section):
    card_interval_s: int = 60
    card_ttl_s: int = 300
    max_invalid_per_peer: int = 20


@dataclass(frozen=True, eq=False)
class SyncConfig(_Section):
    interval_s: int = 30
    batch: int = 512


@dataclass(frozen=True, eq=False)
class LlamaConfig(_Section):
    n_ctx: int = 2048
    n_threads: int = 0
    #: An integer >= -1 (-1: all layers) or "auto".
    n_gpu_layers: int | str = 0
    max_tokens: int = 512
    task_timeout_s: int = 300


@dataclass(frozen=True, eq=False)
class CodepatchConfig(_Section):
    timeout_s: int = 60
    memory_mb: int = 1024
    max_procs: int = 64


@dataclass(frozen=True, eq=False)
class ApiConfig(_Section):
    enabled: bool = True
    listen: str = "127.0.0.1:8411"
    token: str = ""
    max_price: str = "1"


@dataclass(frozen=True, eq=False)
class ArtefactsConfig(_Section):
    direct: bool = True
    direct_port: int = 0


@dataclass(frozen=True, eq=False)
class VerifierConfig(_Section):
    enabled: bool = False
    poll_s: int = 10
    fetch_timeout_s: int = 1800
    max_artefact_mb: int = 32768
    eval_threads: int = 0


@dataclass(frozen=True, eq=False)
class TrainingConfig(_Section):
    #: One of protocol.task.TRAINING_USES.
    use: str = TRAINING_DEFAULT


@dataclass(frozen=True, eq=False)
class CheckpointConfig(_Section):
    interval_s: int = 300


@dataclass(frozen=True, eq=False)
class Config(_Section):
    """The whole config; every default is the one :data:`TEMPLATE` documents."""

    node: NodeConfig = field(default_factory=NodeConfig)
    capacity: CapacityConfig = field(default_factory=CapacityConfig)
    gossip: GossipConfig = field(default_factory=GossipConfig)
    sync: SyncConfig = field(default_factory=SyncConfig)
    llama: LlamaConfig = field(default_factory=LlamaConfig)
    codepatch: CodepatchConfig = field(default_factory=CodepatchConfig)
    api: ApiConfig = field(default_factory=ApiConfig)
    artefacts: ArtefactsConfig = field(default_factory=ArtefactsConfig)
    verifier: VerifierConfig = field(default_factory=VerifierConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)

    @classmethod
    def from_dict(cls, d: Mapping[str, Mapping[str, Any]]) -> Config:
        """From checked section dicts (lists become tuples: the tree is frozen)."""
        sections = {}
        for f in dataclasses.fields(cls):
            kind = f.default_factory  # type: ignore[misc]
            values = {k: tuple(v) if isinstance(v, list) else v for k, v in d.get(f.name, {}).items()}
            sections[f.name] = kind(**values)  # type: ignore[operator]
        return cls(**sections)

#: The defaults as plain dicts (the TOML file's shape), from :class:`Config`.
DEFAULTS: dict[str, dict[str, Any]] = Config().as_dict()

TEMPLATE = """\
# aem node configuration. Every key is shown with its default; delete a line to
# get the default back. Unknown keys are refused, so a typo is caught at start.

[node]
# Multiaddrs to listen on. Port 4001 on every interface by default.
listen = ["/ip4/0.0.0.0/tcp/4001"]
# Peers to dial at start, as full multiaddrs ending in /p2p/PEER_ID.
bootstrap = []
# Find peers on the local network with mDNS (off by default).
mdns = false
# debug, info, warning or error. At info: one line per peer joining or
# leaving, per task served or routed, per capsule loaded.
log_level = "info"

[capacity]
# What this node advertises in its NodeCard. 0 means "detect" for ram_mb and
# "no GPU" for vram_mb.
gpu = ""
vram_mb = 0
ram_mb = 0
# A coarse location bucket such as "eu-west"; used by routers to prefer near hosts.
locality = ""

[gossip]
# How often the NodeCard is re-announced, and how long a card stays valid.
card_interval_s = 60
card_ttl_s = 300
# Invalid messages tolerated from one peer before it is disconnected.
max_invalid_per_peer = 20

[sync]
# Anti-entropy interval with each connected peer, and entries per batch.
interval_s = 30
batch = 512

[llama]
# Context length, CPU threads (0: half the cores, which is where llama.cpp's
# memory-bound generation peaks), layers offloaded to the GPU: 0 none, -1 all,
# "auto" what fits in the GPU's free memory (needs a GPU build of llama.cpp;
# `aemctl doctor` says whether this one is).
n_ctx = 2048
n_threads = 0
n_gpu_layers = 0
# Upper bounds applied to every text task.
max_tokens = 512
task_timeout_s = 300

[codepatch]
# Limits for running a code-patch task's tests in the sandbox.
timeout_s = 60
memory_mb = 1024
max_procs = 64

[api]
# The OpenAI-compatible HTTP API (/v1/...), the status page (/) and
# Prometheus metrics (/metrics), served by `aemd start`.
enabled = true
# HOST:PORT; port 0 picks a free port (`aemctl status` shows it). Anything
# but a loopback address needs a token: the API spends this node's credits.
listen = "127.0.0.1:8411"
# Bearer token every request must carry (Authorization: Bearer TOKEN);
# empty: none (allowed on loopback only).
token = ""
# Most a task may cost, in credits, when a request names no aem_max_price.
max_price = "1"

[artefacts]
# Verifiers fetch the artefacts (model files) of capsules submitted for
# admission from their host. The request, its checks and a one-time token go
# over the encrypted libp2p stream; with direct = true the file's bytes then
# flow over a plain TCP connection to direct_port (0: any free port; the
# host names it in the stream), about 5x faster than a libp2p stream. The
# bytes are checked against the manifest's hash either way, and a verifier
# that cannot reach the port fetches over the stream. It binds where the
# node's first IPv4 listen address does.
direct = true
direct_port = 0

[verifier]
# Measure submitted expert capsules against the admission gates and sign
# AdmissionReports (specs/admission.md). Only a node whose account is one of
# the genesis verifiers may turn this on; `aemd start` refuses otherwise.
enabled = false
# How often to look for capsules to measure (a submission also wakes it).
poll_s = 10
# Longest one artefact fetch may take, and the largest artefact fetched at
# all (besides the limit of the node class a capsule claims).
fetch_timeout_s = 1800
max_artefact_mb = 32768
# CPU threads for evals (0: llama.cpp's default). Figures do not depend on it.
eval_threads = 0

[checkpoint]
# How often this node signs a checkpoint of its own log (its size and Merkle
# root, specs/evidence.md) and gossips it; 0: never. Peers keep the newest
# checkpoint of each node and record two that disagree as fork evidence;
# `aemctl evidence export` proves entries against them.
interval_s = 300

[training]
# May this node's work become training data (`aemctl traces export`,
# specs/task-protocol.md section 8)? "allowed" or "forbidden". As a payer it
# is stamped into every TaskPacket it signs (`aemctl submit-task
# --training-use` overrides it per task); as a host into every receipt it
# signs. An export keeps a task only when both its payer and its host said
# "allowed". Forbidden by default: nobody's prompts or outputs are trained
# on unless they opted in.
use = "forbidden"
"""


def load_config(path: Path) -> Config:
    """The config at ``path`` merged over the defaults (defaults if absent)."""
    cfg = copy.deepcopy(DEFAULTS)
    if not path.exists():
        return Config.from_dict(cfg)
    try:
        raw = tomllib.loads(path.read_text())
    except (OSError, UnicodeDecodeError) as exc:
        raise AemError(errors.CONFIG, f"{path}: cannot read: {exc}") from None
    except tomllib.TOMLDecodeError as exc:
        raise AemError(errors.CONFIG, f"{path}: not valid TOML: {exc}") from None
    for section, values in raw.items():
        if section not in DEFAULTS or not isinstance(values, dict):
            raise AemError(errors.CONFIG, f"{path}: unknown section [{section}]")
        for key, value in values.items():
            if key not in DEFAULTS[section]:
                raise AemError(errors.CONFIG, f"{path}: unknown key {section}.{key}")
            want = type(DEFAULTS[section][key])
            if section == "llama" and key == "n_gpu_layers":
                if value != "auto" and (type(value) is not int or value < -1):
                    raise AemError(errors.CONFIG, f'{path}: llama.n_gpu_layers must be an integer >= -1 or "auto"')
                cfg[section][key] = value
                continue
            if type(value) is not want or (want is list and not all(isinstance(x, str) for x in value)):
                raise AemError(errors.CONFIG, f"{path}: {section}.{key} must be a {want.__name__}")
            if want is int and value < 0:
                raise AemError(errors.CONFIG, f"{path}: {section}.{key} must not be negative")
            if section == "training" and key == "use" and value not in TRAINING_USES:
                raise AemError(errors.CONFIG, f'{path}: training.use must be "allowed" or "forbidden"')
            cfg[section][key] = value
    return Config.from_dict(cfg)
