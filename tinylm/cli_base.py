"""The typer app class every tinylm command group uses: a `UserError` becomes one line and exit code 2."""

from __future__ import annotations

import sys

import typer
from typer.core import TyperGroup

from tinylm.errors import UserError


class _Group(TyperGroup):
    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except UserError as e:
            print(f"error: {e}", file=sys.stderr)
            raise typer.Exit(2) from None
        except FileNotFoundError as e:
            print(f"error: file not found: {e.filename}", file=sys.stderr)
            raise typer.Exit(2) from None


def make_app(**kwargs) -> typer.Typer:
    """A typer app whose commands report `UserError` as `error: <message>` on stderr with exit code 2."""
    kwargs.setdefault("no_args_is_help", True)
    kwargs.setdefault("pretty_exceptions_enable", False)
    kwargs.setdefault("add_completion", False)
    return typer.Typer(cls=_Group, **kwargs)
