"""What the command modules share: adding commands and spec options, checking option values, and
turning what a handler raises into a message and an exit status.

Nothing here imports torch: ``recsys --help`` stays fast; handlers import what they need.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import sys
import traceback
from collections.abc import Callable
from typing import TypeVar

from recsys.errors import RecsysError, UsageError
from recsys.fsutil import output_error

T = TypeVar("T")

Handler = Callable[[argparse.Namespace], int]
SubParsers = argparse._SubParsersAction  # what add_subparsers returns: a command's parent

# exit statuses (documented in ``recsys --help`` and the package docstring)
EXIT_OK = 0
EXIT_INTERNAL = 1  # an unexpected exception: a bug in recsys, reported with its traceback
EXIT_USAGE = 2  # bad options, spec or data: one "error: ..." line (argparse's own errors too)
EXIT_INTERRUPTED = 130  # 128 + SIGINT
EXIT_PIPE = 141  # 128 + SIGPIPE, as a shell reports a command that a closed pipe stopped


# ---- building parsers -----------------------------------------------------------------------------

def add_command(sub: SubParsers, name: str, handler: Handler | None,
                help: str) -> argparse.ArgumentParser:
    """Add command ``name`` under ``sub``: ``help`` is its line in the parent's list and its own
    ``--help`` description; ``handler`` is what runs it (None for a group).

    Other defaults go in ``p.set_defaults(...)`` after the options: an option's own default
    wins over one set before it is added."""
    p = sub.add_parser(name, help=help, description=help[:1].upper() + help[1:] + ".")
    if handler is not None:
        p.set_defaults(func=handler)
    return p


def add_group(sub: SubParsers, name: str, help: str) -> SubParsers:
    """A command group (``recsys data ...``): the subparsers its actions are added to."""
    return add_command(sub, name, None, help).add_subparsers(
        dest="action", required=True, title="actions", metavar="ACTION",
        help=f"what to do (recsys {name} ACTION --help for its options)")


def add_spec(p: argparse.ArgumentParser) -> None:
    """The spec positional and its ``--set`` overrides."""
    p.add_argument("spec", help="experiment spec (TOML)")
    add_overrides(p)


def add_overrides(p: argparse.ArgumentParser) -> None:
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a spec key, e.g. --set train.batch_size=4096 (repeatable)")


def load(args: argparse.Namespace):  # type: ignore[no-untyped-def]
    """The spec that ``args.spec`` and ``args.overrides`` name (a SpecError if it is bad)."""
    from recsys.spec import load_spec

    return load_spec(args.spec, args.overrides)


def check_options(build: Callable[[], T], *options: str) -> T:
    """``build()`` a config from command-line options; the ValueError its checks raise for a bad
    value becomes one error line, the config's field names spelled as the options
    (``steps must be >= 1`` -> ``--steps must be >= 1``)."""
    from pydantic import ValidationError

    try:
        return build()
    except ValidationError as e:
        message = e.errors()[0]["msg"].removeprefix("Value error, ")
    except ValueError as e:
        message = str(e)
    named = message
    for option in sorted(options, key=len, reverse=True):
        named = re.sub(rf"\b{option[2:].replace('-', '_')}\b", option, named)
    raise UsageError(named if named != message else f"{'/'.join(options)}: {message}"
                     ) from None


# ---- running a handler ----------------------------------------------------------------------------

def run_handler(args: argparse.Namespace) -> int:
    """Run the parsed command's handler; what it raises becomes a message and an exit status."""
    try:
        return int(args.func(args))
    except RecsysError as e:
        return error(str(e))
    except BrokenPipeError:
        # whoever read our output stopped (`recsys spec show ... | head`): nothing to report, but
        # stdout must not be flushed again at exit, which would print "Exception ignored"
        drop_stdout()
        return EXIT_PIPE
    except OSError as e:
        # an OSError without a file name: pyarrow's, or print()'s when stdout's disk is full
        output = output_error(e, _output_of(args) if _stdout_ok() else "stdout")
        if output is None:
            return internal_error(e)
        return error(str(output))
    except KeyboardInterrupt:
        _close_progress_bars()
        print("interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except RuntimeError as e:
        if not _peer_gone(e):
            return internal_error(e)
        rank, world = os.environ.get("RANK", "?"), os.environ.get("WORLD_SIZE", "?")
        return error(f"rank {rank} of {world}: another process of this job stopped "
                     f"({_first_line(e)}); its own error says why")
    except Exception as e:
        return internal_error(e)


def error(message: str) -> int:
    """An error the user can fix: one ``error: ...`` line on stderr, exit status 2."""
    _close_progress_bars()
    print(f"error: {message}", file=sys.stderr)
    return EXIT_USAGE


def internal_error(e: BaseException) -> int:
    """An exception nobody expected (a bug): its traceback, then one line saying so; status 1."""
    _close_progress_bars()
    with contextlib.suppress(ValueError):  # (a closed stdout)
        _stdout_ok()  # what the command printed goes before the traceback
    traceback.print_exception(e)
    message = str(e).strip()
    what = f"{type(e).__name__}: {message.splitlines()[0]}" if message else type(e).__name__
    print(f"internal error: {what}\n(a bug in recsys, not a problem with your input; please "
          "report it with the traceback above)", file=sys.stderr)
    return EXIT_INTERNAL


def _close_progress_bars() -> None:
    """Finish the bars the error left open, so the error starts a line of its own and no bar is
    redrawn after it (when the bar is garbage-collected)."""
    if "recsys.progress" in sys.modules:
        from recsys.progress import close_progress_bars

        close_progress_bars()


def _output_of(args: argparse.Namespace) -> str:
    """What a command writes, to name in a "cannot write" error whose OSError names no file
    (pyarrow's do not)."""
    for name in ("out", "json", "run_dir"):
        value = getattr(args, name, None)
        if value:
            return str(value)
    if hasattr(args, "run_dir"):  # recsys train without --run-dir
        return "the run directory"
    return "stdout"  # the only thing the other commands write


def _stdout_ok() -> bool:
    """Whether stdout takes its pending output; if not (its disk is full), it is dropped, so that
    the interpreter's exit flush does not fail a second time with "Exception ignored"."""
    try:
        sys.stdout.flush()
    except OSError:
        drop_stdout()
        return False
    return True


def drop_stdout() -> None:
    """Point stdout's file descriptor at /dev/null (what is still buffered goes there at exit)."""
    try:
        fd = sys.stdout.fileno()
    except (OSError, ValueError):  # not a file descriptor (captured by a test)
        return
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, fd)
    finally:
        os.close(devnull)


# what a gloo / NCCL collective reports when the process on the other end has exited
_PEER_GONE = ("Connection closed by peer", "Connection reset by peer", "Broken pipe")


def _peer_gone(e: RuntimeError) -> bool:
    """Whether ``e`` is a collective failing because another rank of this torchrun job exited
    (after printing its own error): one line for it, not torch's traceback."""
    if int(os.environ.get("WORLD_SIZE", "1") or 1) <= 1 or "torch.distributed" not in sys.modules:
        return False
    return any(s in str(e) for s in _PEER_GONE)


def _first_line(e: BaseException) -> str:
    """The first sentence of an error message, without gloo's ``[source/file.cc:123] `` prefix
    (``Connection closed by peer [127.0.0.1]:24717``)."""
    line = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    if line.startswith("[") and "] " in line:
        line = line.split("] ", 1)[1]
    return line.split(". ", 1)[0].rstrip(".")
