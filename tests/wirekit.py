"""Hypothesis strategies for every wire object, derived from the schemas.

Each field's strategy comes from its kind, then a per-type fix-up makes the
cross-field rules hold (a signer field holding the signing key, a receipt whose
spend authorisation matches it, ...), and signed objects are signed.
"""

from __future__ import annotations

from hypothesis import assume
from hypothesis import strategies as st

from crypto.hashing import H
from crypto.keys import SigningKey
from protocol.errors import AemError
from protocol.schema import Bool, Bytes, ListOf, Obj, Signed, Str, UInt

KEYS = [SigningKey.from_seed(bytes([i + 10]) * 32) for i in range(3)]
BY_PUBLIC = {k.public: k for k in KEYS}
NETS = [H(b"net-a"), H(b"net-b")]

_text = st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=12)


def for_kind(kind) -> st.SearchStrategy:
    if isinstance(kind, Bool):
        return st.booleans()
    if isinstance(kind, UInt):  # SInt too
        return st.one_of(st.integers(kind.lo, kind.hi), st.sampled_from([kind.lo, kind.hi]))
    if isinstance(kind, Bytes):
        if kind.max_len is not None:
            return st.binary(max_size=min(kind.max_len, 48))
        if kind.lengths == (32,):
            return st.sampled_from(NETS + [k.public for k in KEYS]) | st.binary(min_size=32, max_size=32)
        return st.sampled_from(kind.lengths).flatmap(lambda n: st.binary(min_size=n, max_size=n))
    if isinstance(kind, Str):
        if kind.choices:
            return st.sampled_from(kind.choices)
        if kind.pattern is not None:
            return st.from_regex(kind.pattern, fullmatch=True).filter(
                lambda s: len(s.encode()) <= kind.max_len)
        return _text.filter(lambda s: len(s.encode()) <= kind.max_len)
    if isinstance(kind, ListOf):
        key = (lambda x: x.encode() if hasattr(x, "encode") and not isinstance(x, (str, bytes)) else x)
        return st.lists(for_kind(kind.item), max_size=min(kind.max_items, 3),
                        unique_by=key if kind.unique else None).map(tuple)
    if isinstance(kind, Obj):
        return objects(kind.cls)
    raise TypeError(kind)


def _fix(cls_name: str, d: dict) -> dict:
    if cls_name == "Genesis":
        d["verifiers"] = tuple(sorted(set(d["verifiers"])))
        d["quorum"] = max(1, min(d["quorum"], len(d["verifiers"])))
        if not d["verifiers"]:
            d["verifiers"] = (KEYS[0].public,)
        grants = {g.account: g for g in d["grants"]}
        d["grants"] = tuple(grants[a] for a in sorted(grants))
        rates = {r.basis: r for r in d["mint_rates"]}
        d["mint_rates"] = tuple(rates[b] for b in sorted(rates))
    elif cls_name == "AdmissionParams":
        d["classes"] = tuple({c.name: c for c in sorted(d["classes"], key=lambda c: c.name)}.values())
        d["domains"] = tuple({x.domain: x for x in sorted(d["domains"], key=lambda x: x.domain)}.values())
    elif cls_name == "Measurements":
        fp = d["fingerprint"]
        d["fingerprint"] = fp[:len(fp) - len(fp) % 4]
    elif cls_name == "AdmissionReport":
        d["round"] = b"" if d["purpose"] == "admission" else (d["round"] or H(b"round"))
        d["verdict"] = "reject" if d["failed"] else "admit"
    elif cls_name in ("NodeCard", "HostAdvertisement"):
        d["expires_at"] = d["issued_at"] + 1 + d["expires_at"] % 10_000
    elif cls_name == "TaskPacket":
        if d["kind"] == "text":
            d.update(repo_tar=b"", repo_hash=b"", patch="", test_cmd=())
            if d["messages"]:                 # exactly one of prompt or messages
                d["prompt"] = ""
            elif not d["prompt"]:
                d["prompt"] = "x"
        else:
            d.update(prompt="", max_tokens=0, repo_hash=H(d["repo_tar"]), test_cmd=d["test_cmd"] or ("true",),
                     messages=())
    elif cls_name == "InferenceWorkReceipt":
        a = d["spend_auth"]
        if a.host != d["host"]:   # made out to the receipt's host, re-signed by its payer
            a = d["spend_auth"] = a.replace(host=d["host"]).signed(BY_PUBLIC[a.payer])
        d.update(payer=a.payer, task_hash=a.task_hash, net=a.net, charge=min(d["charge"], a.max_charge),
                 finished_at=max(d["finished_at"], d["started_at"]))
    elif cls_name == "TaskRequest":
        t = d["task"]
        d["spend_auth"] = d["spend_auth"].replace(task_hash=t.id, payer=t.payer, net=t.net).signed(
            BY_PUBLIC[t.payer])
    elif cls_name == "Entry":
        d["prev"] = b"" if d["seq"] == 0 else (d["prev"] or H(b"prev"))
    return d


@st.composite
def _build(draw, cls):
    fields = {name: draw(for_kind(kind)) for name, kind in cls._schema()}
    key = None
    if issubclass(cls, Signed):
        key = draw(st.sampled_from(KEYS))
        fields[cls.SIGNER] = key.public
        fields["sig"] = b""
    fields = _fix(cls.__name__, fields)
    try:
        obj = cls(**fields)
    except AemError:
        assume(False)
    return obj.signed(key) if key is not None else obj


def objects(cls) -> st.SearchStrategy:
    return _build(cls)


# Any msgpack-able value, for fuzzing decoders with well-formed but wrong input.
msgpack_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1) | st.floats(allow_nan=False)
    | st.binary(max_size=40) | _text,
    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(_text | st.integers(0, 5), inner, max_size=5),
    max_leaves=20,
)
