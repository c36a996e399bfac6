"""What every `aemd` and `aemctl` command shares: exit codes, error printing,
JSON output and progress on a terminal.

Exit codes (stable, for scripts):
  0  success
  1  the command failed (bad input, invalid data, refused work)
  2  usage error (argparse)
  3  no node is running at the home's control socket
  4  a check found problems (e.g. `ledger-verify` found forks or bad entries)
  5  timed out
 130 interrupted (Ctrl-C)
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Any, Callable, Sequence

from protocol import errors
from protocol.errors import AemError

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_NO_NODE = 3
EXIT_PROBLEMS = 4
EXIT_TIMEOUT = 5
EXIT_INTERRUPTED = 130

_EXIT_FOR_CODE = {errors.NO_NODE: EXIT_NO_NODE, errors.TIMEOUT: EXIT_TIMEOUT}


def add_home(p: argparse.ArgumentParser) -> None:
    p.add_argument("--home", metavar="DIR",
                   help="node home directory (default: $AEM_HOME, else ~/.local/share/aem)")


def add_json(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true", help="print machine-readable JSON")


def to_jsonable(v: Any) -> Any:
    """bytes become lower-case hex; tuples lists; everything else as is."""
    if isinstance(v, (bytes, bytearray)):
        return bytes(v).hex()
    if isinstance(v, dict):
        return {str(k) if not isinstance(k, bytes) else k.hex(): to_jsonable(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [to_jsonable(x) for x in v]
    return v


def print_json(v: Any) -> None:
    sys.stdout.write(json.dumps(to_jsonable(v), indent=2, sort_keys=True) + "\n")


def fmt_credits(micro: int) -> str:
    """Micro-credits as a decimal number of credits, exact."""
    sign = "-" if micro < 0 else ""
    whole, frac = divmod(abs(micro), 1_000_000)
    return f"{sign}{whole}.{frac:06d}"


class Progress:
    """A one-line progress counter on stderr, shown only on a terminal and at
    most a few times per second, so piping output stays clean and cheap."""

    def __init__(self, label: str, total: int | None = None, stream: Any = None) -> None:
        self.label, self.total = label, total
        self.stream = stream or sys.stderr
        self.enabled = hasattr(self.stream, "isatty") and self.stream.isatty()
        self._last = 0.0

    def update(self, done: int) -> None:
        if not self.enabled:
            return
        now = time.monotonic()
        if now - self._last < 0.2:
            return
        self._last = now
        tail = f"/{self.total}" if self.total else ""
        self.stream.write(f"\r{self.label}: {done}{tail}")
        self.stream.flush()

    def done(self) -> None:
        if self.enabled and self._last:
            self.stream.write("\r\033[K")
            self.stream.flush()


def add_global_options(parser: argparse.ArgumentParser) -> None:
    """``--home`` and ``--json`` before the command as well as after it
    (``aemctl --home X status`` = ``aemctl status --home X``). Their own dests,
    because a subcommand's default (None) would overwrite a value given before
    it; :func:`run_main` merges them."""
    parser.add_argument("--home", dest="global_home", metavar="DIR",
                        help="node home directory (also accepted after the command)")
    parser.add_argument("--json", dest="global_json", action="store_true",
                        help="machine-readable JSON, for commands that print (also after the command)")


def _merge_global_options(args: argparse.Namespace) -> None:
    home = getattr(args, "global_home", None)
    if home is not None and getattr(args, "home", None) is None:
        args.home = home
    if getattr(args, "global_json", False):
        args.json = True


def _os_error_code(exc: OSError) -> str:
    if isinstance(exc, FileNotFoundError):
        return errors.NOT_FOUND
    if isinstance(exc, PermissionError):
        return errors.REFUSED
    if isinstance(exc, (IsADirectoryError, NotADirectoryError, FileExistsError)):
        return errors.BAD_VALUE
    return errors.UNAVAILABLE


def run_main(parser: argparse.ArgumentParser, argv: Sequence[str] | None) -> int:
    """Parse, dispatch to ``args.func(args) -> int``, and turn every failure
    into a one-line message and an exit code (no tracebacks): AemError with
    its code; an OSError that a command did not anticipate (a path that is a
    file, a full disk) with the closest code; anything else as INTERNAL, since
    it is a bug, with ``AEM_DEBUG=1`` showing the traceback."""
    args = parser.parse_args(argv)
    _merge_global_options(args)
    func: Callable[[argparse.Namespace], int] | None = getattr(args, "func", None)
    if func is None:
        parser.print_help()
        return EXIT_USAGE
    try:
        return func(args) or EXIT_OK
    except AemError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return _EXIT_FOR_CODE.get(exc.code, EXIT_FAILED)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        return EXIT_OK
    except OSError as exc:
        where = f": {exc.filename}" if exc.filename else ""
        print(f"error: {_os_error_code(exc)}: {exc.strerror or exc}{where}", file=sys.stderr)
        return EXIT_FAILED
    except Exception as exc:  # noqa: BLE001 - the last line of defence against a traceback
        if os.environ.get("AEM_DEBUG"):
            raise
        detail = " ".join(f"{type(exc).__name__}: {exc}".split())[:300]
        print(f"error: {errors.INTERNAL}: {detail} (AEM_DEBUG=1 shows the traceback)", file=sys.stderr)
        return EXIT_FAILED
