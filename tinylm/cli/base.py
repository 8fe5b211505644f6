"""The typer app class every tinylm command group uses, and the one place bad input becomes `error: ...`.

Bad input is a `UserError`, an `OSError` on a path (unwritable, not a folder, missing) or a usage error of the
command line. Each ends as one line on stderr and exit code 2, whichever copy of click raised the usage error:
typer bundles its own (`typer._click`), whose exceptions are not `click`'s. SIGINT and SIGTERM end a command
with one line too, and exit code 128 + the signal number (see `tinylm.interrupt`).
"""

from __future__ import annotations

import signal
import sys

import typer
from typer.core import TyperGroup
from typer.exceptions import TyperException

from tinylm.errors import UserError
from tinylm.interrupt import Interrupted, terminate_raises

EXIT_BAD_INPUT = 2
EXIT_INTERRUPTED = 130
"""128 + SIGINT's number, as a shell reports Ctrl-C."""


try:  # typer no longer needs click, but a command may still raise click's exceptions when it is installed
    import click as _click
except ImportError:
    _click = None


def _typer_and_click(typer_type: type, click_name: str) -> tuple[type, ...]:
    return (typer_type,) + ((getattr(_click.exceptions, click_name),) if _click is not None else ())


USAGE_ERRORS = _typer_and_click(TyperException, "ClickException")
EXITS = _typer_and_click(typer.Exit, "Exit")
ABORTS = _typer_and_click(typer.Abort, "Abort") + (KeyboardInterrupt,)


def os_error_message(e: OSError) -> str:
    """The path and the reason: `/runs/x: Permission denied`."""
    reason = e.strerror or str(e) or type(e).__name__
    if e.filename is None:
        return reason
    if isinstance(e, FileNotFoundError) and e.filename2 is None:
        return f"file not found: {e.filename}"
    if isinstance(e, (FileExistsError, NotADirectoryError)):
        reason += " (a file is where a folder is needed)"
    target = f"{e.filename} -> {e.filename2}" if e.filename2 is not None else str(e.filename)
    return f"{target}: {reason}"


def _usage_message(e) -> str:
    message = e.format_message()
    ctx = getattr(e, "ctx", None)
    if ctx is not None and getattr(e, "exit_code", 1) == EXIT_BAD_INPUT:
        message += f" (see `{ctx.command_path} --help`)"
    return message


def error_message(e: BaseException) -> str | None:
    """The one-line message for bad input, or None when `e` is not bad input (a bug: let it show)."""
    if isinstance(e, UserError):
        message = str(e)
    elif isinstance(e, OSError):
        message = os_error_message(e)
    elif isinstance(e, USAGE_ERRORS):
        message = _usage_message(e)
    else:
        return None
    return " ".join(message.split())


def report(e: BaseException) -> int | None:
    """Print `error: <message>` for bad input and return its exit code; None when `e` is not bad input."""
    message = error_message(e)
    if message is None:
        return None
    print(f"error: {message}", file=sys.stderr)
    return EXIT_BAD_INPUT


def _shows_help(e: BaseException) -> bool:
    # A group called with nothing to do asks for its help text, which is no error.
    return type(e).__name__ == "NoArgsIsHelpError"


def run(app: typer.Typer, argv: list[str] | None, prog_name: str = "tinylm") -> int:
    """Run a typer app and return its exit code: 2 with one line for bad input, 130 when interrupted."""
    try:
        with terminate_raises():
            code = app(args=argv, prog_name=prog_name, standalone_mode=False)
    except EXITS as e:
        return e.exit_code
    except SystemExit as e:
        return e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    except Interrupted as e:
        print(str(e), file=sys.stderr)
        return e.exit_code
    except ABORTS:
        print("interrupted by SIGINT", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception as e:
        if _shows_help(e):
            print(e.format_message())
            return 0
        code = report(e)
        if code is None:
            raise
        return code
    return code if isinstance(code, int) else 0


class _Group(TyperGroup):
    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except (UserError, OSError) as e:
            report(e)
            raise typer.Exit(EXIT_BAD_INPUT) from None
        except KeyboardInterrupt:  # caught here: typer would turn it into a silent exit 130
            raise Interrupted(signal.SIGINT) from None


def make_app(**kwargs) -> typer.Typer:
    """A typer app whose commands report bad input as `error: <message>` on stderr with exit code 2."""
    kwargs.setdefault("no_args_is_help", True)
    kwargs.setdefault("pretty_exceptions_enable", False)
    kwargs.setdefault("add_completion", False)
    return typer.Typer(cls=_Group, **kwargs)
