"""Contributions measured by their delta (``specs/growth.md``): the pure part.

A contribution is committed to by a :class:`ContributionDocument`, a canonical
record (not a signed wire object) that binds the file's hash to its licence and
policies; ``content_commitment = H(canonical.encode(document))`` is what a
ContributionReceipt carries, so no receipt can drop or swap the licence its
file was offered under.

The ``eval_improvement`` figure of a knowledge contribution: the domain's best
admitted expert answers the domain's target eval with the contribution's text
as context and without it, greedy and seeded; the figure is the gain in basis
points, never negative. It is 0 when the contribution contains the eval's
items (word shingles, :func:`contaminated_items`) or repeats the file of an
earlier contribution under another document (:func:`near_duplicate_of`).

The ``accepted_delta`` figure of an eval contribution (a qa eval set): how far
it separates the admitted experts of its domain, the highest score minus the
lowest (:func:`separation_bp`); 0 with fewer than two experts, and 0 for a copy
of an existing eval (:func:`copy_of`: the same content hash, or most of its
items' prompts shingled from one existing set's prompts).

The figure of a skill (``verified_skill_use``) or an operator
(``operator_adoption``) is counted, not measured (:func:`count_uses`): the
applied, acknowledged, unvoided receipts of tasks whose ``uses`` name it, by
payers and hosts other than the contributor, settled in the period
``(T_prev, T]`` the receipt's eval_id ``uses-T`` pins.

Everything here is pure: bytes and values in, values out. The daemon's shell
(``aemd/growth.py``) runs the model, the streams and the files.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Iterable, Mapping, Sequence

from crypto.hashing import H
from protocol import canonical, errors
from protocol.errors import AemError
from protocol.evalset import BP, EvalItem, EvalSet, parse_evalset, score_bp
from protocol.mesh import TEACHER_TERMS, TeacherPolicyCard
from protocol.receipts import CONTRIBUTION_TYPES, ContributionReceipt

__all__ = [
    "DOC_FORMAT", "BASIS", "CONTEXT_TYPES", "MEASURABLE", "SHINGLE_WORDS", "CONTAMINATION_BP", "CONTEXT_BUDGET_BYTES",
    "CONTEXT_PREFIX", "MAX_CONTRIBUTION_BYTES", "MAX_POLICY_CHARS", "NOT_DISTILLED",
    "ContributionDocument", "check_licence", "check_teacher", "anti_distillation",
    "words", "shingles", "contaminated_items", "near_duplicate_of", "context_text",
    "eval_improvement", "Figure", "build_core", "attest_problem", "best_expert",
    "encode_msg", "decode_msg", "MAX_REQUEST_BYTES", "MAX_RESPONSE_BYTES",
    "BASES", "EVAL_BASIS", "COPY_BP", "basis_of", "check_eval_file", "copied_items", "copy_of",
    "separation_bp", "SKILL_BASIS", "OPERATOR_BASIS", "USE_TYPES", "USE_MARGIN_S", "UseRecord", "uses_eval_id",
    "period_end", "previous_period", "qualifying_uses", "count_uses", "check_as_of",
]

DOC_FORMAT = "aem-contribution/1"
BASIS = "eval_improvement"
EVAL_BASIS = "accepted_delta"
#: Types measured as text supplied to the domain's best expert as context
#: (issue: "eval_improvement for knowledge, data shards and curricula").
CONTEXT_TYPES = ("knowledge", "data_shard", "curriculum")
SKILL_BASIS = "verified_skill_use"
OPERATOR_BASIS = "operator_adoption"
#: Types measured by counting the log's receipts of tasks that used them (§7).
USE_TYPES = ("skill", "operator")
BASES = {**{t: BASIS for t in CONTEXT_TYPES}, "eval": EVAL_BASIS,
         "skill": SKILL_BASIS, "operator": OPERATOR_BASIS}   # the basis each measurable type is credited on
MEASURABLE = tuple(BASES)              # types with a measured figure today; the others are refused
COPY_BP = 5000                         # an eval is a copy when half its items come from one set
SHINGLE_WORDS = 8                      # words per shingle
CONTAMINATION_BP = 5000                # an item is in the contribution when half its shingles are
CONTEXT_BUDGET_BYTES = 2048            # of the contribution's text supplied as context
CONTEXT_PREFIX = "Use this knowledge to answer:\n"
MAX_CONTRIBUTION_BYTES = 1 << 20       # a contribution file, as served to verifiers
MAX_POLICY_CHARS = 256                 # source_policy / training_use: the receipt's TEXT fields
MAX_REQUEST_BYTES = 64 << 10           # an attest-stream request frame
MAX_RESPONSE_BYTES = 8 << 10           # an attest-stream response frame
NOT_DISTILLED = "declared: not distilled from third-party models"

# An SPDX short identifier (e.g. "CC-BY-4.0", "MIT", "GPL-2.0+") or a
# LicenseRef-; expressions (AND/OR/WITH) are not taken: one licence, named.
_SPDX = re.compile(r"(LicenseRef-[A-Za-z0-9.-]{1,53}|[A-Za-z0-9][A-Za-z0-9.-]{0,62}\+?)")
_NO_LICENCE = ("NONE", "NOASSERTION")
_DOMAIN = re.compile(r"[a-z0-9][a-z0-9._-]{0,63}")
_HEX64 = re.compile(r"[0-9a-f]{64}")


def check_licence(spdx: str | None) -> str:
    """The licence id, or AemError(REFUSED) when it is missing or not an SPDX id."""
    if not spdx or not spdx.strip():
        raise AemError(errors.REFUSED, "no --license: a contribution names the SPDX licence it is offered "
                                       "under (e.g. CC-BY-4.0, CC0-1.0, MIT)")
    spdx = spdx.strip()
    if not _SPDX.fullmatch(spdx):
        raise AemError(errors.REFUSED, f"--license {spdx[:40]!r} is not an SPDX licence id "
                                       "(letters, digits, '.', '-', an optional '+', or LicenseRef-...)")
    if spdx.upper() in _NO_LICENCE:
        raise AemError(errors.REFUSED, f"--license {spdx}: says there is no licence; name the one it has")
    return spdx


def _policy(text: str | None, flag: str) -> str:
    if text is None or not text.strip():
        raise AemError(errors.REFUSED, f"no {flag}: say where the content came from and under which terms"
                       if flag == "--source-policy" else f"no {flag}: say what others may train on it")
    text = " ".join(text.split())
    if len(text) > MAX_POLICY_CHARS:
        raise AemError(errors.REFUSED, f"{flag} is longer than {MAX_POLICY_CHARS} characters")
    return text


def check_teacher(card: TeacherPolicyCard | None, distilled_from: str | None) -> None:
    """A declared third-party-model origin needs a card whose distillation
    terms are ``allowed`` (and that names that model)."""
    if card is None:
        if distilled_from:
            raise AemError(errors.REFUSED, f"--distilled-from {distilled_from[:40]!r} without --teacher-policy: "
                                           "content made with a third-party model needs the model's "
                                           "TeacherPolicyCard, with distillation allowed")
        return
    if card.distillation != "allowed":
        raise AemError(errors.REFUSED, f"the teacher policy of {card.teacher[:40]!r} says distillation is "
                                       f"{card.distillation!r}: only 'allowed' may be contributed")
    if distilled_from and distilled_from != card.teacher:
        raise AemError(errors.REFUSED, f"--distilled-from {distilled_from[:40]!r} but the teacher policy is "
                                       f"for {card.teacher[:40]!r}")


def anti_distillation(card: TeacherPolicyCard | None) -> str:
    """The receipt's ``anti_distillation`` text for a document's teacher card."""
    if card is None:
        return NOT_DISTILLED
    return f"distilled from {card.teacher[:100]} under {card.licence[:60]}: distillation allowed"[:256]


@dataclass(frozen=True)
class ContributionDocument:
    """What a contribution's commitment is taken over."""
    type: str
    domain: str
    licence: str
    source_policy: str
    training_use: str
    teacher_policy: TeacherPolicyCard | None
    file_hash: bytes
    file_size: int

    def __post_init__(self) -> None:
        if self.type not in CONTRIBUTION_TYPES:
            raise AemError(errors.BAD_VALUE, f"contribution type must be one of {', '.join(CONTRIBUTION_TYPES)}")
        if not isinstance(self.domain, str) or not _DOMAIN.fullmatch(self.domain):
            raise AemError(errors.BAD_VALUE, "domain must match [a-z0-9][a-z0-9._-]{0,63}")
        check_licence(self.licence)
        for name in ("source_policy", "training_use"):
            v = getattr(self, name)
            if not isinstance(v, str) or not v.strip() or len(v) > MAX_POLICY_CHARS or v != " ".join(v.split()):
                raise AemError(errors.BAD_VALUE, f"{name} must be 1..{MAX_POLICY_CHARS} characters, "
                                                 "single-spaced")
        if self.teacher_policy is not None:
            if not isinstance(self.teacher_policy, TeacherPolicyCard):
                raise AemError(errors.BAD_TYPE, "teacher_policy must be a TeacherPolicyCard")
            check_teacher(self.teacher_policy, None)
        if not isinstance(self.file_hash, bytes) or len(self.file_hash) != 32:
            raise AemError(errors.BAD_VALUE, "file_hash is 32 bytes")
        if type(self.file_size) is not int or not 1 <= self.file_size <= MAX_CONTRIBUTION_BYTES:
            raise AemError(errors.BAD_VALUE, f"file_size must be 1..{MAX_CONTRIBUTION_BYTES}")

    def to_map(self) -> dict:
        m: dict[str, Any] = {"format": DOC_FORMAT, "type": self.type, "domain": self.domain,
                             "licence": self.licence, "source_policy": self.source_policy,
                             "training_use": self.training_use, "file_hash": self.file_hash,
                             "file_size": self.file_size}
        if self.teacher_policy is not None:
            m["teacher_policy"] = self.teacher_policy.to_map()
        return m

    def encode(self) -> bytes:
        return canonical.encode(self.to_map())

    @property
    def commitment(self) -> bytes:
        return H(self.encode())

    @classmethod
    def from_map(cls, m: Any) -> "ContributionDocument":
        if not isinstance(m, Mapping):
            raise AemError(errors.BAD_TYPE, "a contribution document is a map")
        if m.get("format") != DOC_FORMAT:
            raise AemError(errors.WRONG_OBJECT, f"format must be {DOC_FORMAT!r}")
        want = {"format", "type", "domain", "licence", "source_policy", "training_use", "file_hash", "file_size"}
        extra = set(m) - want - {"teacher_policy"}
        if extra:
            raise AemError(errors.UNKNOWN_FIELD, f"contribution document: unknown field {sorted(map(str, extra))[0][:32]!r}")
        missing = want - set(m)
        if missing:
            raise AemError(errors.MISSING_FIELD, f"contribution document: missing {sorted(missing)[0]!r}")
        tp = m.get("teacher_policy")
        card = TeacherPolicyCard.from_map(tp, "teacher_policy") if tp is not None else None
        for k in ("type", "domain", "licence", "source_policy", "training_use"):
            if not isinstance(m[k], str):
                raise AemError(errors.BAD_TYPE, f"{k} must be a string")
        if not isinstance(m["file_hash"], (bytes, bytearray)):
            raise AemError(errors.BAD_TYPE, "file_hash must be bytes")
        return cls(type=m["type"], domain=m["domain"], licence=m["licence"], source_policy=m["source_policy"],
                   training_use=m["training_use"], teacher_policy=card, file_hash=bytes(m["file_hash"]),
                   file_size=m["file_size"])

    @classmethod
    def make(cls, *, type: str, domain: str, licence: str | None, source_policy: str | None,
             training_use: str | None, teacher_policy: TeacherPolicyCard | None, distilled_from: str | None,
             data: bytes) -> "ContributionDocument":
        """The document of a file offered under these terms; the command's
        refusals (licence, policies, teacher card) in that order."""
        lic = check_licence(licence)
        src = _policy(source_policy, "--source-policy")
        use = _policy(training_use, "--training-use")
        check_teacher(teacher_policy, distilled_from)
        if not data:
            raise AemError(errors.REFUSED, "the contribution file is empty")
        if len(data) > MAX_CONTRIBUTION_BYTES:
            raise AemError(errors.REFUSED, f"the contribution file is {len(data)} bytes; at most "
                                           f"{MAX_CONTRIBUTION_BYTES}")
        if type not in CONTRIBUTION_TYPES:
            raise AemError(errors.BAD_VALUE, f"--type must be one of {', '.join(CONTRIBUTION_TYPES)}")
        if type not in MEASURABLE:
            raise AemError(errors.REFUSED, f"a {type} contribution is not measurable yet (measured "
                                           f"today: {', '.join(MEASURABLE)}; specs/growth.md)")
        if type in CONTEXT_TYPES or type in USE_TYPES:
            try:
                bytes(data).decode("utf-8")
            except UnicodeDecodeError:
                raise AemError(errors.REFUSED, f"a {type} contribution is UTF-8 text" + (
                    " (it is measured as context for the domain's expert)" if type in CONTEXT_TYPES else
                    " (the skill's text or the operator's description)")) from None
        if type == "eval":
            check_eval_file(data)
        return cls(type=type, domain=domain, licence=lic, source_policy=src, training_use=use,
                   teacher_policy=teacher_policy, file_hash=H(bytes(data)), file_size=len(data))


def basis_of(type: str) -> str:
    """The credit basis a measurable contribution type is credited on."""
    basis = BASES.get(type)
    if basis is None:
        raise AemError(errors.REFUSED, f"a {type} contribution is not measurable yet")
    return basis


def check_eval_file(data: bytes) -> EvalSet:
    """The eval set an eval contribution's file holds: a valid set of kind
    ``qa`` (``specs/admission-evals.md``), or AemError(REFUSED) saying why not."""
    try:
        s = parse_evalset(bytes(data))
    except AemError as exc:
        raise AemError(errors.REFUSED, f"an eval contribution is an aem-evalset/1 file: {exc.detail}"[:300]) from None
    if s.kind != "qa":
        raise AemError(errors.REFUSED, f"an eval contribution is an eval set of kind qa, not {s.kind}")
    return s


# --- contamination and near-duplicates -------------------------------------------------

def words(text: str) -> list[str]:
    """The casefolded text's maximal runs of characters for which
    ``str.isalnum`` holds, in order."""
    out: list[str] = []
    cur: list[str] = []
    for c in text.casefold():
        if c.isalnum():
            cur.append(c)
        elif cur:
            out.append("".join(cur))
            cur = []
    if cur:
        out.append("".join(cur))
    return out


def shingles(ws: Sequence[str], k: int = SHINGLE_WORDS) -> set[tuple[str, ...]]:
    """Every run of ``k`` consecutive words; a text of fewer words is one
    shingle of all of them (none when it has no words)."""
    if not ws:
        return set()
    if len(ws) < k:
        return {tuple(ws)}
    return {tuple(ws[i:i + k]) for i in range(len(ws) - k + 1)}


def _runs(ws: Sequence[str], n: int) -> set[tuple[str, ...]]:
    return {tuple(ws[j:j + n]) for j in range(len(ws) - n + 1)}


def contaminated_items(text: str, items: Iterable[EvalItem], *, k: int = SHINGLE_WORDS,
                       threshold_bp: int = CONTAMINATION_BP) -> list[int]:
    """Indices of the eval items found in ``text``. An item is found when
    both its question and its answer are there: at least ``threshold_bp`` of
    its prompt's shingles are shingles of the text (a prompt of fewer than
    ``k`` words: its words occur in the text in a row), and its answer's words
    occur in the text in a row. Words as :func:`words` gives them."""
    tw = words(text)
    cache: dict[int, set[tuple[str, ...]]] = {}

    def pool(n: int) -> set[tuple[str, ...]]:
        if n not in cache:
            cache[n] = _runs(tw, n)
        return cache[n]
    found = []
    for i, it in enumerate(items):
        pw, aw = words(it.prompt), words(it.answer)
        mine = shingles(pw, k)
        if not mine or not aw:
            continue
        have = pool(min(len(pw), k))
        hit = sum(1 for s in mine if s in have)
        if hit * BP >= threshold_bp * len(mine) and tuple(aw) in pool(len(aw)):
            found.append(i)
    return found


def near_duplicate_of(table: Mapping[bytes, bytes], doc: ContributionDocument) -> bytes | None:
    """The earlier commitment whose document had this file (``table``: file
    hash -> the first commitment this verifier measured it under), when it is
    another document: the same file offered again under other terms."""
    earlier = table.get(doc.file_hash)
    return earlier if earlier is not None and earlier != doc.commitment else None


def copied_items(items: Iterable[EvalItem], source: Iterable[EvalItem], *, k: int = SHINGLE_WORDS,
                 threshold_bp: int = CONTAMINATION_BP) -> list[int]:
    """Indices of the ``items`` whose prompt comes from ``source``: at least
    ``threshold_bp`` of its prompt's shingles are runs of words of one of the
    source's prompts (runs never cross from one prompt to the next). Answers
    do not count: the same questions with reworded answers are the same eval."""
    prompts = [words(it.prompt) for it in source]
    cache: dict[int, set[tuple[str, ...]]] = {}

    def pool(n: int) -> set[tuple[str, ...]]:
        if n not in cache:
            cache[n] = set().union(*(_runs(pw, n) for pw in prompts)) if prompts else set()
        return cache[n]
    found = []
    for i, it in enumerate(items):
        pw = words(it.prompt)
        mine = shingles(pw, k)
        if not mine:
            continue
        have = pool(min(len(pw), k))
        hit = sum(1 for s in mine if s in have)
        if hit * BP >= threshold_bp * len(mine):
            found.append(i)
    return found


def copy_of(s: EvalSet, existing: Iterable[tuple[str, bytes, Sequence[EvalItem]]], *,
            threshold_bp: int = COPY_BP) -> str:
    """Why ``s`` is a copy of an existing eval (``""``: it is not).
    ``existing`` holds (name, content hash, items) of the sets it must not
    repeat, in the order to report them: a set with the same content hash (a
    reformatted file of the same set), or one from which at least
    ``threshold_bp`` of ``s``'s items come (:func:`copied_items`)."""
    for name, h, items in existing:
        if h == s.hash:
            return f"the same eval set as {name}"
        n = len(copied_items(s.items, items))
        if n * BP >= threshold_bp * len(s.items):
            return f"{n} of its {len(s.items)} items come from {name}"
    return ""


def separation_bp(scores: Sequence[int]) -> int:
    """How far an eval separates the experts it was run on: the highest score
    minus the lowest, in basis points; 0 with fewer than two experts."""
    if any(type(x) is not int or not 0 <= x <= BP for x in scores):
        raise AemError(errors.BAD_VALUE, f"scores are basis points in 0..{BP}")
    return max(scores) - min(scores) if len(scores) >= 2 else 0


# --- the figure -------------------------------------------------------------------------

def context_text(data: bytes) -> str:
    """The contribution's text as the model sees it: its first
    ``CONTEXT_BUDGET_BYTES`` bytes cut back to a whole UTF-8 character,
    whitespace-stripped, after ``CONTEXT_PREFIX``."""
    head = bytes(data[:CONTEXT_BUDGET_BYTES])
    text = head.decode("utf-8", errors="ignore") if len(data) > CONTEXT_BUDGET_BYTES else head.decode("utf-8")
    return CONTEXT_PREFIX + text.strip()


def eval_improvement(with_context: Sequence[bool], without: Sequence[bool]) -> int:
    """max(0, score_bp(with) - score_bp(without)) over the same items."""
    if len(with_context) != len(without):
        raise AemError(errors.BAD_VALUE, "the two runs cover different items")
    return max(0, score_bp(with_context) - score_bp(without))


@dataclass(frozen=True)
class Figure:
    """One verifier's measurement of one document. For an eval contribution
    ``eval_id`` is the contributed set's hash, ``expert`` the best-scoring
    expert on it, ``with_bp``/``without_bp`` the highest and lowest score."""
    commitment: bytes
    eval_id: str           # the eval set's hash, hex: the domain's target set (knowledge), the contributed set (eval)
    expert: bytes          # the capsule id measured with (b"" when none could be)
    delta: int             # basis points; 0 when ``zero_reason``
    with_bp: int
    without_bp: int
    zero_reason: str       # "" or why the figure is 0 whatever the runs say

    def to_map(self) -> dict:
        return {"commitment": self.commitment, "eval_id": self.eval_id, "expert": self.expert,
                "delta": self.delta, "with_bp": self.with_bp, "without_bp": self.without_bp,
                "zero_reason": self.zero_reason}


def best_expert(admitted: Iterable[tuple[bytes, str, str, int]], domain: str) -> bytes | None:
    """The domain's best admitted GGUF expert: ``admitted`` holds (capsule id,
    domain, kind, target_bp); the highest target_bp, then the lowest id."""
    rows = [(-bp, cid) for cid, dom, kind, bp in admitted if dom == domain and kind == "gguf"]
    return min(rows)[1] if rows else None


def build_core(*, net: bytes, contributor: bytes, doc: ContributionDocument, eval_id: str, delta: int,
               created_at: int) -> ContributionReceipt:
    """The receipt every verifier attests: unsigned, no attestations yet."""
    return ContributionReceipt(
        net=net, contributor=contributor, contribution_type=doc.type, credit_basis=basis_of(doc.type),
        source_policy=doc.source_policy, training_use=doc.training_use,
        anti_distillation=anti_distillation(doc.teacher_policy), content_commitment=doc.commitment,
        eval_id=eval_id, measured_delta=delta, created_at=created_at, attestations=(), sig=b"")


def attest_problem(core: ContributionReceipt, doc: ContributionDocument, *, net: bytes, contributor: bytes,
                   figure: Figure) -> str:
    """Why this verifier must not attest ``core`` (``""``: it may). Its own
    figure must be the receipt's, for the document the receipt commits to."""
    if core.net != net:
        return "the receipt is for another network"
    if core.contributor != contributor:
        return "the receipt names another contributor than the peer asking"
    if core.attestations or core.sig:
        return "attest the core: no attestations, no signature"
    if core.content_commitment != doc.commitment or figure.commitment != doc.commitment:
        return "the receipt does not commit to this document"
    want = build_core(net=net, contributor=contributor, doc=doc, eval_id=figure.eval_id, delta=figure.delta,
                      created_at=core.created_at)
    for name in ("contribution_type", "credit_basis", "source_policy", "training_use", "anti_distillation",
                 "eval_id"):
        if getattr(core, name) != getattr(want, name):
            return f"the receipt's {name} is not the document's"
    if core.measured_delta != figure.delta:
        return f"measured {figure.delta} bp here, not {core.measured_delta}"
    return ""


# --- counted uses: verified_skill_use and operator_adoption (specs/growth.md §7) --------

USE_MARGIN_S = 60          # a pinned time is at least this far in the past, so synced verifiers agree
_USES_ID = re.compile(r"uses-(0|[1-9][0-9]{0,18})")


@dataclass(frozen=True)
class UseRecord:
    """What the count reads of one applied InferenceWorkReceipt, from the log."""
    receipt_id: bytes
    host: bytes
    payer: bytes
    task_hash: bytes
    uses: tuple            # the receipt's ``uses``: commitments
    settle_at: int         # ledger.rules.settle_time
    acked: bool            # its payer's ReceiptAck (accepted) is applied
    voided: bool           # challenged or disputed (an applying one), or voided


def uses_eval_id(as_of: int) -> str:
    """The eval_id of the period ending at ``as_of``: one receipt per period."""
    return f"uses-{as_of}"


def period_end(eval_id: str) -> int | None:
    """``T`` of an eval_id ``uses-T``; None for any other eval_id."""
    m = _USES_ID.fullmatch(eval_id) if isinstance(eval_id, str) else None
    return int(m.group(1)) if m else None


def previous_period(minted: Iterable[tuple], commitment: bytes, basis: str) -> int:
    """``T_prev``: the largest ``T`` of the applied contributions ``minted``
    ((content_commitment, eval_id, credit_basis), as the ledger keeps them) of
    this commitment and basis; 0 if none. A period ending at or before it
    counts nothing, so periods never overlap."""
    best = 0
    for c, eval_id, b in minted:
        if c != commitment or b != basis:
            continue
        t = period_end(eval_id)
        if t is not None and t > best:
            best = t
    return best


def qualifying_uses(records: Iterable[UseRecord], commitment: bytes, contributor: bytes,
                    after: int, upto: int) -> list[UseRecord]:
    """The receipts that count as uses of ``commitment`` in the period
    ``(after, upto]``: the receipt names it, is acknowledged by its payer and
    not voided, and neither its payer nor its host is the contributor; one per
    (payer, task_hash), the earliest-settling (then lowest id) of the whole
    log, counted in the period it settles in, so a task never counts twice
    whatever the periods."""
    first: dict[tuple[bytes, bytes], UseRecord] = {}
    for r in records:
        if commitment not in r.uses or not r.acked or r.voided or contributor in (r.payer, r.host):
            continue
        k = (r.payer, r.task_hash)
        if k not in first or (r.settle_at, r.receipt_id) < (first[k].settle_at, first[k].receipt_id):
            first[k] = r
    return sorted((r for r in first.values() if after < r.settle_at <= upto), key=lambda r: r.receipt_id)


def count_uses(records: Iterable[UseRecord], commitment: bytes, contributor: bytes, after: int,
               upto: int) -> int:
    """The figure of a skill or operator contribution for the period ``(after, upto]``."""
    if upto <= after:
        return 0
    return len(qualifying_uses(records, commitment, contributor, after, upto))


def check_as_of(as_of: Any, now: int, margin: int = USE_MARGIN_S) -> int:
    """A pinned time a verifier counts at: an integer at most ``now - margin``."""
    if type(as_of) is not int or as_of < 1:
        raise AemError(errors.BAD_VALUE, "as_of is a positive integer time (seconds)")
    if as_of > now - margin:
        raise AemError(errors.REFUSED, f"as_of {as_of} is less than {margin} s in the past (now {now}): "
                                       "verifiers count only a settled past")
    return as_of


# --- the attest stream's messages -------------------------------------------------------

_OPS = ("measure", "attest")


def encode_msg(m: dict, limit: int) -> bytes:
    data = canonical.encode(m)
    if len(data) > limit:
        raise AemError(errors.TOO_LARGE, f"attest message of {len(data)} bytes > {limit}")
    return data


def decode_msg(data: bytes, limit: int) -> dict:
    m = canonical.decode(data, limit)
    if not isinstance(m, dict):
        raise AemError(errors.BAD_TYPE, "an attest message is a map")
    return m


def parse_request(data: bytes) -> tuple[str, ContributionDocument, ContributionReceipt | None, int | None]:
    """(op, document, receipt core for ``attest``, pinned time for a skill or
    operator) of a request frame."""
    m = decode_msg(data, MAX_REQUEST_BYTES)
    op = m.get("op")
    if op not in _OPS:
        raise AemError(errors.BAD_VALUE, f"op must be one of {', '.join(_OPS)}")
    doc = ContributionDocument.from_map(m.get("doc"))
    allowed = {"op", "doc"} | ({"core"} if op == "attest" else set()) | ({"as_of"} if doc.type in USE_TYPES else set())
    if set(m) != allowed:
        raise AemError(errors.BAD_VALUE, f"a {op} request holds exactly {', '.join(sorted(allowed))}")
    core = ContributionReceipt.from_map(m["core"], "core") if op == "attest" else None
    as_of = m.get("as_of")
    if as_of is not None and (type(as_of) is not int or as_of < 1):
        raise AemError(errors.BAD_VALUE, "as_of is a positive integer time (seconds)")
    return op, doc, core, as_of


def is_hex64(s: Any) -> bool:
    return isinstance(s, str) and bool(_HEX64.fullmatch(s))


__all__ += ["parse_request", "is_hex64", "TEACHER_TERMS"]
