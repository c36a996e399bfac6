"""A code-patch capsule's patch policy, enforced on a diff
(``specs/admission-codepatch.md`` §2).

The tests that judge a patch are only a judge while the patch cannot change
them: a patch that edits ``test_calc.py`` to expect the bug, or adds a
``unittest.py`` that the interpreter imports before the standard library's,
"passes" without fixing anything. So a capsule's manifest names the paths a
patch may touch and the paths it may never touch, and every patch is checked
against them *before* anything runs.

Patterns (``PatchPolicy.allowed_paths`` / ``protected_paths``) are
"/"-separated, relative. A component is a literal name, a glob with ``*``
(any run of characters within one name), or ``**`` (zero or more whole
components). A pattern matches a path when it matches the path or one of its
ancestor directories, so ``tests`` covers everything under ``tests/``; a
trailing "/" changes nothing. Protected wins over allowed: a path is
writable when some allowed pattern matches it and no protected one does.

Everything here is pure text processing, so every verifier refuses the same
patches (gate 7). The checks are deliberately conservative: where GNU patch
might read a file name in more than one way (``-p1`` stripping a prefix
that may or may not be there), every reading must be permitted.
"""

from __future__ import annotations

import re

from protocol.errors import BAD_VALUE, AemError

__all__ = ["MAX_PATTERN", "MAX_PATTERNS", "check_pattern", "pattern_matches", "policy_problem",
           "check_patch", "diff_names", "readings"]

MAX_PATTERN = 256
MAX_PATTERNS = 32
MAX_PATH_BYTES = 1024
MAX_DEPTH = 64
MAX_COMPONENT_STARS = 4

# Characters a pattern component may hold beyond "*": enough for real source
# trees, and nothing that means something to a shell or to fnmatch.
_COMPONENT = re.compile(r"[A-Za-z0-9_.+@~=,%-]+")
_HUNK = re.compile(r"^@@ -(\d+)(?:,(\d+))? \+\d+(?:,(\d+))? @@")
# What may stand outside a hunk in a plain unified diff (git's extended
# headers included). Anything else (ed scripts, context diffs, normal diffs,
# mail headers) is refused: GNU patch guesses the format of what it reads, and
# a format we do not parse could name files we did not check.
_HEADERS = ("diff ", "index ", "--- ", "+++ ", "old mode ", "new mode ", "deleted file mode ",
            "new file mode ", "similarity index ", "dissimilarity index ", "rename from ",
            "rename to ", "copy from ", "copy to ")
_REGULAR_MODES = ("100644", "100755")


def check_pattern(p: object) -> tuple[str, ...]:
    """A pattern's components; raises ``AemError(BAD_VALUE)`` when malformed."""
    if type(p) is not str or not p or len(p.encode("utf-8", "surrogatepass")) > MAX_PATTERN:
        raise AemError(BAD_VALUE, f"path pattern must be a string of 1..{MAX_PATTERN} bytes")
    body = p[:-1] if p.endswith("/") else p
    if not body or body.startswith("/"):
        raise AemError(BAD_VALUE, f"path pattern {p[:64]!r} must be relative and non-empty")
    parts = tuple(body.split("/"))
    if len(parts) > MAX_DEPTH:
        raise AemError(BAD_VALUE, f"path pattern {p[:64]!r} is too deep")
    for c in parts:
        if c == "**":
            continue
        if c in ("", ".", "..") or "**" in c or c.count("*") > MAX_COMPONENT_STARS:
            raise AemError(BAD_VALUE, f"path pattern {p[:64]!r} has a bad component {c[:32]!r}")
        if not _COMPONENT.fullmatch(c.replace("*", "x")):
            raise AemError(BAD_VALUE, f"path pattern {p[:64]!r} holds a character patterns do not allow")
    return parts


def _name_matches(pat: str, name: str) -> bool:
    """``*`` glob match of one name, in O(len(pat) * len(name)) at worst (the
    classic two-pointer match: a star only ever moves forward)."""
    p = n = 0
    star, mark = -1, 0
    while n < len(name):
        if p < len(pat) and pat[p] != "*" and pat[p] == name[n]:
            p += 1
            n += 1
        elif p < len(pat) and pat[p] == "*":
            star, mark = p, n
            p += 1
        elif star >= 0:
            p, mark = star + 1, mark + 1
            n = mark
        else:
            return False
    while p < len(pat) and pat[p] == "*":
        p += 1
    return p == len(pat)


def _glob(pat: tuple[str, ...], path: tuple[str, ...]) -> bool:
    """Whether ``pat`` matches exactly ``path`` ("**" = zero or more components).
    Iterative over positions, so hostile patterns cost O(len(pat) * len(path))."""
    # reach[j]: the pattern's first i components can consume the path's first j
    reach = [True] + [False] * len(path)
    for c in pat:
        if c == "**":
            nxt, seen = [], False
            for r in reach:
                seen = seen or r
                nxt.append(seen)
        else:
            nxt = [False] + [reach[j] and _name_matches(c, path[j]) for j in range(len(path))]
        reach = nxt
    return reach[len(path)]


def pattern_matches(pattern: str, path: tuple[str, ...]) -> bool:
    """Whether ``pattern`` matches ``path`` (components) or one of its ancestors."""
    pat = check_pattern(pattern)
    return any(_glob(pat, path[:k]) for k in range(1, len(path) + 1))


def policy_problem(policy) -> str:
    """"" when every pattern of ``policy`` (a protocol.mesh.PatchPolicy) is
    well-formed and each list is non-empty, else why not."""
    for what, pats in (("allowed", policy.allowed_paths), ("protected", policy.protected_paths)):
        if not pats:
            return f"the patch policy has no {what} paths"
        if len(pats) > MAX_PATTERNS:
            return f"the patch policy has more than {MAX_PATTERNS} {what} paths"
        for p in pats:
            try:
                check_pattern(p)
            except AemError as exc:
                return exc.detail[:128]
    return ""


def _diff_name(s: str) -> str:
    s = s.split("\t", 1)[0].rstrip("\r")
    if len(s) >= 2 and s.startswith('"') and s.endswith('"'):
        s = s[1:-1]
    return s


def readings(name: str) -> list[tuple[str, ...]]:
    """The paths GNU patch ``-p1`` might take ``name`` for: with and without
    its first component. Raises on absolute names, ``..`` and oversize."""
    if not name or "\x00" in name or len(name.encode("utf-8", "surrogatepass")) > MAX_PATH_BYTES:
        raise AemError(BAD_VALUE, f"bad file name {name[:64]!r}")
    if name.startswith("/"):
        raise AemError(BAD_VALUE, f"absolute file name {name[:64]!r}")
    parts = tuple(x for x in name.split("/") if x not in ("", "."))
    if ".." in parts:
        raise AemError(BAD_VALUE, f"file name with '..' {name[:64]!r}")
    if not parts or len(parts) > MAX_DEPTH:
        raise AemError(BAD_VALUE, f"bad file name {name[:64]!r}")
    return [parts, parts[1:]] if len(parts) > 1 else [parts]


def skip_hunk(lines: list[str], i: int, old_n: int, new_n: int) -> tuple[int, int, int]:
    """Step over a hunk body from line ``i`` by its line counts (``\\ No
    newline`` markers count for neither side); returns the next line and the
    counts left (non-zero when the diff ends first). A line that is not
    context, removal or addition is a malformed hunk."""
    while (old_n > 0 or new_n > 0) and i < len(lines):
        body = lines[i]
        i += 1
        if body.startswith("\\"):
            continue
        tag = body[:1]
        if tag in (" ", ""):
            old_n -= 1
            new_n -= 1
        elif tag == "-":
            old_n -= 1
        elif tag == "+":
            new_n -= 1
        else:
            raise AemError(BAD_VALUE, f"diff: malformed hunk at line {i}")
    return i, old_n, new_n


def diff_names(diff: str) -> tuple[list[str], set[str]]:
    """Every file name a plain unified diff names (in order), and those it
    creates. Raises ``AemError(BAD_VALUE)`` when ``diff`` is not a plain
    unified diff of regular text files."""
    names: list[str] = []
    created: set[str] = set()
    lines = diff.split("\n")
    old_name: str | None = None
    new_name: str | None = None
    new_file = False
    headers = 0
    i = 0
    while i < len(lines):
        line = lines[i]
        i += 1
        m = _HUNK.match(line)
        if m:
            old_n, new_n = int(m.group(2) or 1), int(m.group(3) or 1)
            if old_name is None or new_name is None:
                raise AemError(BAD_VALUE, f"hunk without file headers at line {i}")
            if m.group(1) == "0" and old_n == 0:    # from nothing: ``diff -N``'s new file
                created.add(new_name)
            i, old_n, new_n = skip_hunk(lines, i, old_n, new_n)
            if old_n > 0 or new_n > 0:
                raise AemError(BAD_VALUE, "the diff ends inside a hunk")
            continue
        if line in ("", "\r") or line.startswith("\\"):
            continue
        if not line.startswith(_HEADERS):
            raise AemError(BAD_VALUE, f"not a plain unified diff (line {i}: {line[:40]!r})")
        if line.startswith("diff "):
            old_name, new_name, new_file = None, None, False
            toks = line.split(" ")
            if line.startswith("diff --git "):
                toks = line[len("diff --git "):].split(" ")[:2]
            else:                           # "diff -ruN a/x b/x": its last two words
                toks = [t for t in toks[1:] if t and not t.startswith("-")][-2:]
            names.extend(_diff_name(t) for t in toks)
        elif line.startswith("--- "):
            old_name, new_name = _diff_name(line[4:]), None
            names.append(old_name)
        elif line.startswith("+++ "):
            if old_name is None:
                raise AemError(BAD_VALUE, f"'+++' without '---' at line {i}")
            n = new_name = _diff_name(line[4:])
            names.append(n)
            headers += 1
            if old_name == "/dev/null" or new_file:
                created.add(n)
        elif line.startswith(("rename from ", "rename to ", "copy from ", "copy to ")):
            n = _diff_name(line.split(" ", 2)[2])
            names.append(n)
            if line.startswith(("rename to ", "copy to ")):
                created.add(n)
        elif line.startswith(("old mode ", "new mode ", "deleted file mode ", "new file mode ")):
            mode = line.rsplit(" ", 1)[1].strip()
            if mode not in _REGULAR_MODES:
                raise AemError(BAD_VALUE, f"mode {mode[:16]!r}: a patch changes regular files only")
            if line.startswith("new file mode "):
                new_file = True
    if headers == 0:
        raise AemError(BAD_VALUE, "the diff names no file (no '+++' header)")
    return names, created


def _shadows(path: tuple[str, ...]) -> bool:
    """A new top-level module or package: the interpreter that runs the tests
    starts in the repository, so it would import it in place of the standard
    library's (``argparse.py``) or the test runner's (``unittest/``)."""
    return (len(path) == 1 and path[0].endswith(".py")) or (len(path) == 2 and path[1] == "__init__.py")


def check_patch(policy, diff: str) -> str:
    """"" when ``diff`` respects ``policy`` (a protocol.mesh.PatchPolicy), else
    why not (at most 128 characters). The rules, in order
    (``specs/admission-codepatch.md`` §2.2): UTF-8 text within
    ``max_diff_bytes``; a plain unified diff of regular files; no absolute
    name or ``..``; no reading of any name protected; some reading of every
    name allowed; no new top-level Python module or package."""
    return _check_patch(policy, diff)[:128]


def _check_patch(policy, diff: str) -> str:
    problem = policy_problem(policy)
    if problem:
        return problem
    if type(diff) is not str:
        return "the patch is not text"
    try:
        size = len(diff.encode("utf-8"))
    except UnicodeEncodeError:
        return "the patch is not valid UTF-8 text"
    if size > policy.max_diff_bytes:
        return f"the patch is {size} bytes, more than the policy's {policy.max_diff_bytes}"
    if "\x00" in diff:
        return "the patch holds NUL bytes"
    try:
        names, created = diff_names(diff)
        for name in names:
            if name == "/dev/null":
                continue
            rs = readings(name)
            for r in rs:
                hit = next((p for p in policy.protected_paths if pattern_matches(p, r)), None)
                if hit is not None:
                    return f"the patch touches {'/'.join(r)[:48]!r}, protected by {hit[:32]!r}"
            if not any(pattern_matches(p, r) for r in rs for p in policy.allowed_paths):
                return f"the patch touches {name[:64]!r}, outside the allowed paths"
            if name in created and any(_shadows(r) for r in rs):
                return f"the patch creates a top-level module {name[:64]!r}"
    except AemError as exc:
        return f"the patch is refused: {exc.detail}"
    return ""
