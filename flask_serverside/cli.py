"""The ``flask sessions`` commands."""

from __future__ import annotations

import sys
import typing as t

import click
from flask import current_app
from flask.cli import AppGroup

from .exceptions import BackendUnavailable

sessions_cli = AppGroup("sessions", help="Inspect and maintain server-side sessions.")


def _ext() -> t.Any:
    return current_app.extensions["serverside"]


def _run(func: t.Callable[[], t.Any]) -> t.Any:
    """Run a store operation; exit with a one-line reason if it cannot."""
    try:
        return func()
    except NotImplementedError as exc:
        raise click.ClickException(str(exc)) from exc
    except BackendUnavailable as exc:
        raise click.ClickException(
            f"The session store is unavailable: {exc.__cause__!r}"
        ) from exc


@sessions_cli.command("cleanup")
def cleanup_command() -> None:
    """Remove expired sessions and print how many were removed."""
    from .extension import _store

    steps = _store().cleanup()
    removed = 0
    with click.progressbar(
        steps, label="Removing expired sessions", file=sys.stderr
    ) as bar:
        removed = _run(lambda: sum(bar))
    click.echo(f"Removed {removed} expired sessions.")


@sessions_cli.command("count")
def count_command() -> None:
    """Print the number of live sessions."""
    click.echo(_run(_ext().count))


@sessions_cli.command("delete")
@click.argument("sid")
def delete_command(sid: str) -> None:
    """Revoke the session SID (the bare ID or the signed cookie value)."""
    if not _run(lambda: _ext().delete(sid)):
        click.echo("No such session.", err=True)
        sys.exit(1)
    click.echo("Session deleted.")


@sessions_cli.command("clear")
@click.confirmation_option(prompt="Remove every session? All users will be logged out.")
def clear_command() -> None:
    """Remove every session."""
    click.echo(f"Removed {_run(_ext().clear)} sessions.")
