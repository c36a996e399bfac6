"""Typed wire objects with one declarative schema each.

A wire object is a frozen dataclass whose fields carry a ``kind`` (``UInt``,
``Bytes``, ``Str``, ``ListOf``, ``Obj`` ...). From that one declaration come
construction-time validation, the canonical map, strict decoding (exact key set,
types, ranges) and, for signed objects, the signable bytes. So a rule such as
"a key is 32 bytes" lives in exactly one place.

On the wire an object is a map holding its fields plus ``type`` and
``version``; a *record* (a nested helper such as a genesis grant) has no
``type``/``version`` of its own. Signed objects hold their signature in
``sig`` and name the field holding the signer's public key in ``SIGNER``; the
signature covers ``domain || canonical(map without sig)`` (see
``crypto/domains.py``).
"""

from __future__ import annotations

import abc
import dataclasses
import re
from typing import Any, ClassVar, TypeVar

from crypto import domains
from crypto.hashing import H
from protocol import canonical, errors
from protocol.errors import AemError

T = TypeVar("T", bound="WireObject")

U63 = 2**63 - 1


class Kind(abc.ABC):
    """How one field is checked. ``check`` returns the Python value for a wire
    value (converting nested maps to objects); ``dump`` does the reverse."""

    @abc.abstractmethod
    def check(self, v: Any, where: str) -> Any: ...

    def dump(self, v: Any) -> Any:
        return v

    @abc.abstractmethod
    def spec(self) -> str:
        """How the spec's field tables write this kind."""


def _bad_type(where: str, want: str, v: Any) -> AemError:
    return AemError(errors.BAD_TYPE, f"{where}: expected {want}, got {type(v).__name__}")


class UInt(Kind):
    def __init__(self, lo: int = 0, hi: int = U63) -> None:
        self.lo, self.hi = lo, hi

    def check(self, v: Any, where: str) -> int:
        if type(v) is not int:
            raise _bad_type(where, "int", v)
        if not self.lo <= v <= self.hi:
            raise AemError(errors.BAD_VALUE, f"{where}: {v} outside [{self.lo}, {self.hi}]")
        return v

    def spec(self) -> str:
        return f"int {_num(self.lo)}..{_num(self.hi)}"


class SInt(UInt):
    def __init__(self, lo: int = -U63, hi: int = U63) -> None:
        super().__init__(lo, hi)


class Bool(Kind):
    def check(self, v: Any, where: str) -> bool:
        if type(v) is not bool:
            raise _bad_type(where, "bool", v)
        return v

    def spec(self) -> str:
        return "bool"


class Bytes(Kind):
    """Bytes of one of the allowed exact lengths, or of at most ``max_len``."""

    def __init__(self, *lengths: int, max_len: int | None = None) -> None:
        self.lengths, self.max_len = lengths, max_len

    def check(self, v: Any, where: str) -> bytes:
        if type(v) is not bytes:
            raise _bad_type(where, "bytes", v)
        if self.max_len is not None:
            if len(v) > self.max_len:
                raise AemError(errors.TOO_LARGE, f"{where}: {len(v)} bytes > {self.max_len}")
        elif len(v) not in self.lengths:
            raise AemError(errors.BAD_VALUE, f"{where}: length {len(v)} not in {self.lengths}")
        return v

    def spec(self) -> str:
        if self.max_len is not None:
            return f"bin <= {_num(self.max_len)}"
        return "bin " + " or ".join(str(n) for n in self.lengths)


class Str(Kind):
    def __init__(self, max_len: int, *, choices: tuple[str, ...] | None = None,
                 pattern: str | None = None) -> None:
        self.max_len, self.choices = max_len, choices
        self.pattern = re.compile(pattern) if pattern else None

    def check(self, v: Any, where: str) -> str:
        if type(v) is not str:
            raise _bad_type(where, "str", v)
        if len(v.encode("utf-8", "surrogatepass")) > self.max_len:
            raise AemError(errors.TOO_LARGE, f"{where}: longer than {self.max_len} bytes")
        if self.choices is not None and v not in self.choices:
            raise AemError(errors.BAD_VALUE, f"{where}: {v!r} not one of {self.choices}")
        if self.pattern is not None and not self.pattern.fullmatch(v):
            raise AemError(errors.BAD_VALUE, f"{where}: {v!r} is malformed")
        try:
            v.encode("utf-8")
        except UnicodeEncodeError:
            raise AemError(errors.BAD_VALUE, f"{where}: not valid UTF-8 text") from None
        return v

    def spec(self) -> str:
        out = f"str <= {_num(self.max_len)}"
        if self.choices:
            out += " one of " + ", ".join(self.choices)
        if self.pattern is not None:
            out += f" matching `{self.pattern.pattern}`"
        return out


class ListOf(Kind):
    def __init__(self, item: Kind, max_items: int, *, unique: bool = False) -> None:
        self.item, self.max_items, self.unique = item, max_items, unique

    def check(self, v: Any, where: str) -> tuple:
        if type(v) not in (list, tuple):
            raise _bad_type(where, "list", v)
        if len(v) > self.max_items:
            raise AemError(errors.TOO_LARGE, f"{where}: more than {self.max_items} items")
        out = tuple(self.item.check(x, f"{where}[{i}]") for i, x in enumerate(v))
        if self.unique and len(set(map(self._key, out))) != len(out):
            raise AemError(errors.BAD_VALUE, f"{where}: duplicate items")
        return out

    @staticmethod
    def _key(x: Any) -> Any:
        return canonical.encode(x.to_map()) if isinstance(x, WireObject) else x

    def dump(self, v: Any) -> list:
        return [self.item.dump(x) for x in v]

    def spec(self) -> str:
        return f"array <= {self.max_items} of ({self.item.spec()})" + (", distinct" if self.unique else "")


class Obj(Kind):
    def __init__(self, cls: type[WireObject]) -> None:
        self.cls = cls

    def check(self, v: Any, where: str) -> WireObject:
        if isinstance(v, self.cls):
            return v
        if type(v) is not dict:
            raise _bad_type(where, f"{self.cls.__name__} map", v)
        return self.cls.from_map(v, where)

    def dump(self, v: Any) -> dict:
        return v.to_map()

    def spec(self) -> str:
        return self.cls.__name__


def _num(n: int) -> str:
    """Powers of two as 2^k (minus one where it fits), so tables stay readable."""
    for k in range(8, 65):
        if n == 2**k:
            return f"2^{k}"
        if n == 2**k - 1:
            return f"2^{k}-1"
        if n == -(2**k - 1):
            return f"-(2^{k}-1)"
    return str(n)


# Shorthands used by every object definition; the spec names them too.
KEY = Bytes(32)                   # raw Ed25519 public key, also an account id
HASH = Bytes(32)                  # SHA-256 digest
HASH_OR_EMPTY = Bytes(0, 32)
SIG = Bytes(0, 64)                # empty only while an object is being built
NONCE = Bytes(16)
TIME = UInt()                     # Unix seconds
AMOUNT = UInt(0, 2**62)           # micro-credits
NAME = Str(64, pattern=r"[a-z0-9][a-z0-9._-]{0,63}")
TAG = Str(64, pattern=r"[a-z0-9][a-z0-9._:-]{0,63}")
TEXT = Str(256)


def f(kind: Kind) -> Any:
    """Declare a wire field of the given kind (a required dataclass field)."""
    return dataclasses.field(metadata={"kind": kind})


def _remember_maps(obj: WireObject, m: dict) -> None:
    """Keep, on a freshly decoded object and the objects nested in it, the
    canonical map each was decoded from (nothing else holds these maps)."""
    object.__setattr__(obj, "_wire_map", m)
    for name, is_list in obj._plan().nested:
        if is_list:
            for o, sub in zip(getattr(obj, name), m[name]):
                _remember_maps(o, sub)
        else:
            _remember_maps(getattr(obj, name), m[name])


class _Plan:
    """What a wire class's schema implies, computed once per class: the field
    checks with their error locations, the exact key set, and the canonical
    key order of its map."""

    __slots__ = ("checks", "fast_checks", "nested", "expected", "dump", "direct")

    def __init__(self, cls: type) -> None:
        where = cls.TYPE or cls.__name__
        schema = cls._schema()
        self.checks = tuple((name, kind, f"{where}.{name}") for name, kind in schema)
        # The same checks with the common kinds' success test inlined, for
        # from_map: (name, kind, where, tag, a, b). A value that fails the
        # inline test goes through kind.check, which raises the usual error.
        fast = []
        for name, kind, w in self.checks:
            t = type(kind)
            if t is Bytes and kind.max_len is None:
                fast.append((name, kind, w, 1, frozenset(kind.lengths), 0))
            elif t is Bytes:
                fast.append((name, kind, w, 2, kind.max_len, 0))
            elif t is UInt or t is SInt:
                fast.append((name, kind, w, 3, kind.lo, kind.hi))
            elif t is Str and kind.choices is not None and kind.pattern is None:
                ok = frozenset(c for c in kind.choices if c.isascii() and len(c) <= kind.max_len)
                fast.append((name, kind, w, 4, ok, 0))
            elif t is Str and kind.choices is None:
                # ASCII text: its UTF-8 form is itself, so the length check is len().
                fast.append((name, kind, w, 5, kind.max_len, kind.pattern))
            else:
                fast.append((name, kind, w, 0, 0, 0))
        self.fast_checks = tuple(fast)
        self.nested = tuple((name, type(kind) is ListOf) for name, kind in schema
                            if type(kind) is Obj or (type(kind) is ListOf and type(kind.item) is Obj))
        keys = [name for name, _ in schema] + (["type", "version"] if cls.TYPE else [])
        self.expected = frozenset(keys)
        kinds = dict(schema)
        self.dump = tuple(
            (k, kinds.get(k), k in kinds and type(kinds[k]).dump is Kind.dump)
            for k in sorted(keys, key=lambda k: k.encode()))
        # from_map may set the fields itself only when construction is the
        # plain dataclass __init__ followed by WireObject.__post_init__.
        self.direct = (dataclasses.is_dataclass(cls)
                       and all(fl.init for fl in dataclasses.fields(cls))
                       and "__init__" in cls.__dict__
                       and cls.__post_init__ is WireObject.__post_init__)


class WireObject:
    """Base of every wire object and record. Subclasses are frozen dataclasses."""

    TYPE: ClassVar[str] = ""        # empty for records
    VERSION: ClassVar[int] = 1
    MAX_SIZE: ClassVar[int] = 4096  # bytes of the canonical encoding
    _fields: ClassVar[tuple[tuple[str, Kind], ...]]

    @classmethod
    def _schema(cls) -> tuple[tuple[str, Kind], ...]:
        s = cls.__dict__.get("_fields_cache")
        if s is None:
            s = tuple((fl.name, fl.metadata["kind"]) for fl in dataclasses.fields(cls))
            cls._fields_cache = s
        return s

    @classmethod
    def _plan(cls) -> _Plan:
        """Per-class tables derived once from the schema (performance only:
        they hold nothing that the schema does not already say)."""
        p = cls.__dict__.get("_plan_cache")
        if p is None:
            p = _Plan(cls)
            cls._plan_cache = p
        return p

    def __post_init__(self) -> None:
        for name, kind, where in self._plan().checks:
            object.__setattr__(self, name, kind.check(getattr(self, name), where))
        self._validate()

    def _validate(self) -> None:
        """Cross-field rules of one object; overridden where there are any."""

    # -- maps and bytes ------------------------------------------------------

    def to_map(self) -> dict:
        # Keys come out in canonical order, so canonical.encode need not re-sort.
        m = {}
        for key, kind, plain in self._plan().dump:
            if kind is None:
                m[key] = self.TYPE if key == "type" else self.VERSION
            else:
                v = getattr(self, key)
                m[key] = v if plain else kind.dump(v)
        return m

    @classmethod
    def from_map(cls: type[T], m: Any, where: str = "") -> T:
        where = where or cls.TYPE or cls.__name__
        if type(m) is not dict:
            raise _bad_type(where, "map", m)
        plan = cls.__dict__.get("_plan_cache") or cls._plan()
        expected = plan.expected
        if cls.TYPE:
            if m.get("type") != cls.TYPE:
                raise AemError(errors.WRONG_OBJECT, f"{where}: type is {m.get('type')!r}, expected {cls.TYPE!r}")
            # An exact type test, never ==: in Python True == 1, and a msgpack
            # `true` must not pass as version 1 (nor as any other integer).
            v = m.get("version")
            if type(v) is not int or v != cls.VERSION:
                raise AemError(errors.WRONG_OBJECT, f"{where}: unsupported version {m.get('version')!r}")
        if m.keys() != expected:
            unknown = set(m) - expected
            if unknown:
                raise AemError(errors.UNKNOWN_FIELD, f"{where}: unknown field {sorted(unknown)[0]!r}")
            missing = expected - set(m)
            if missing:
                raise AemError(errors.MISSING_FIELD, f"{where}: missing field {sorted(missing)[0]!r}")
        if not plan.direct:
            return cls(**{name: m[name] for name, _ in cls._schema()})
        # The same checks, in the same order, as cls(**fields) followed by
        # __post_init__, without building the object twice.
        obj = object.__new__(cls)
        setattr_ = object.__setattr__
        for name, kind, fwhere, tag, a, b in plan.fast_checks:
            v = m[name]
            if tag == 1:
                if type(v) is bytes and len(v) in a:
                    setattr_(obj, name, v)
                    continue
            elif tag == 3:
                if type(v) is int and a <= v <= b:
                    setattr_(obj, name, v)
                    continue
            elif tag == 2:
                if type(v) is bytes and len(v) <= a:
                    setattr_(obj, name, v)
                    continue
            elif tag == 4:
                if type(v) is str and v in a:
                    setattr_(obj, name, v)
                    continue
            elif tag == 5:
                if type(v) is str and v.isascii() and len(v) <= a and (b is None or b.fullmatch(v)):
                    setattr_(obj, name, v)
                    continue
            setattr_(obj, name, kind.check(v, fwhere))
        obj._validate()
        return obj

    def encode(self) -> bytes:
        # Objects are immutable, so their canonical bytes are computed once.
        data = self.__dict__.get("_canonical")
        if data is None:
            data = canonical.encode(self.to_map())
            if len(data) > self.MAX_SIZE:
                raise AemError(errors.TOO_LARGE, f"{self.TYPE}: {len(data)} bytes > {self.MAX_SIZE}")
            object.__setattr__(self, "_canonical", data)
        return data

    @classmethod
    def decode(cls: type[T], data: bytes) -> T:
        """Strictly decode canonical bytes; only AemError can leave here."""
        m = canonical.decode(data, cls.MAX_SIZE)
        try:
            obj = cls.from_map(m)
        except RecursionError:  # pragma: no cover - bounded by canonical.MAX_DEPTH
            raise AemError(errors.TOO_DEEP, "nesting too deep") from None
        if type(data) is bytes:
            # canonical.decode proved that these bytes are the encoding of m,
            # and to_map() of the object is m again: remember both (m is a
            # fresh value nobody else holds), so encode() and signable() need
            # not rebuild them.
            object.__setattr__(obj, "_canonical", data)
            _remember_maps(obj, m)
        return obj

    @property
    def id(self) -> bytes:
        """The object's id: the hash of its canonical (signed) bytes."""
        return H(self.encode())

    def replace(self: T, **changes: Any) -> T:
        return dataclasses.replace(self, **changes)


class Signed(WireObject):
    """A wire object signed by the key in its ``SIGNER`` field.

    Every signed object except the genesis names its network in ``net``; the
    signature domain holds the object type and that network id, so a
    signature never verifies for another type or another network.
    """

    SIGNER: ClassVar[str] = ""

    def network(self) -> bytes:
        return self.net  # type: ignore[attr-defined]

    def signable(self) -> bytes:
        wire = self.__dict__.get("_wire_map")
        if wire is not None:   # decoded: its map is canonical already
            m = {k: v for k, v in wire.items() if k != "sig"}
            return domains.signable(self.TYPE, self.network(), canonical.encode_decoded(m))
        m = self.to_map()
        del m["sig"]
        return domains.signable(self.TYPE, self.network(), canonical.encode(m))

    def signed(self: T, key: Any) -> T:
        """A copy signed with ``key`` (a crypto.keys.SigningKey) whose public
        key must be the one in the signer field."""
        if key.public != getattr(self, self.SIGNER):
            raise AemError(errors.BAD_KEY, f"{self.TYPE}: signing key is not the {self.SIGNER} key")
        unsigned = self.replace(sig=b"")
        return unsigned.replace(sig=key.sign_raw(unsigned.signable()))

    def verify(self, net: bytes | None = None, now: int | None = None) -> None:
        """Check network, expiry (when ``now`` is given) and signature(s);
        raise AemError on the first failure."""
        if net is not None and self.network() != net:
            raise AemError(errors.WRONG_NETWORK, f"{self.TYPE}: object is for another network")
        expires = getattr(self, "expires_at", None)
        if now is not None and expires is not None and now >= expires:
            raise AemError(errors.EXPIRED, f"{self.TYPE}: expired at {expires}")
        if len(self.sig) != 64:  # type: ignore[attr-defined]
            raise AemError(errors.BAD_SIGNATURE, f"{self.TYPE}: not signed")
        domains.verify(getattr(self, self.SIGNER), self.signable(), self.sig)  # type: ignore[attr-defined]
        self._verify_nested(now)

    def _verify_nested(self, now: int | None) -> None:
        """Verify signed objects embedded in this one (none by default)."""


def decode_one_of(data: bytes, classes: dict[str, type[T]], max_size: int) -> T:
    """Decode a message that may be any of ``classes`` (keyed by type name),
    dispatching on its ``type`` field, each under its own size limit."""
    m = canonical.decode(data, max_size)
    cls = classes.get(m.get("type")) if type(m) is dict else None
    if cls is None:
        raise AemError(errors.WRONG_OBJECT, f"not one of {sorted(classes)}")
    if len(data) > cls.MAX_SIZE:
        raise AemError(errors.TOO_LARGE, f"{cls.TYPE}: {len(data)} bytes > {cls.MAX_SIZE}")
    return cls.from_map(m)
