"""The ``flask sessions`` commands."""

from __future__ import annotations

import sys
import typing as t

import click
from flask import current_app
from flask.cli import AppGroup

from .exceptions import BackendUnavailable

if t.TYPE_CHECKING:
    from .store import SessionStore

sessions_cli = AppGroup("sessions", help="Inspect and maintain server-side sessions.")


def _ext() -> t.Any:
    return current_app.extensions["serverside"]


def _run(func: t.Callable[[], t.Any]) -> t.Any:
    """Run a store operation; exit with a one-line reason if it cannot."""
    try:
        return func()
    except (NotImplementedError, RuntimeError) as exc:
        # RuntimeError: a setting the app needs is missing (SECRET_KEY with
        # SESSION_SIGN_ID, the table with SESSION_SQLALCHEMY_CREATE_TABLE
        # off); its message says which.
        raise click.ClickException(str(exc)) from exc
    except BackendUnavailable as exc:
        raise click.ClickException(
            f"The session store is unavailable: {exc.__cause__!r}"
        ) from exc


@sessions_cli.command("cleanup")
def cleanup_command() -> None:
    """Remove expired sessions and print how many were removed."""
    steps = _store().cleanup()
    # The first step runs before the bar is drawn, so that a store that
    # cannot be used fails with its reason alone.
    removed = _run(lambda: next(steps, 0))
    with click.progressbar(
        steps, label="Removing expired sessions", file=sys.stderr
    ) as bar:
        removed += _run(lambda: sum(bar))
    click.echo(f"Removed {removed} expired sessions.")


@sessions_cli.command("count")
def count_command() -> None:
    """Print the number of live sessions."""
    click.echo(_run(_ext().count))


@sessions_cli.command("delete")
@click.argument("sid")
def delete_command(sid: str) -> None:
    """Revoke the session SID (the bare ID or the signed cookie value)."""
    if _run(lambda: _ext()._sid(sid)) is None:
        from .extension import _interface

        signed = " or a cookie value signed with this app's SECRET_KEY"
        raise click.BadParameter(
            f"{sid!r} is not a session ID{signed if _interface().sign_id else ''}.",
            param_hint="'SID'",
        )
    if not _run(lambda: _ext().delete(sid)):
        click.echo("No such session.", err=True)
        sys.exit(1)
    click.echo("Session deleted.")


@sessions_cli.command("clear")
@click.confirmation_option(prompt="Remove every session? All users will be logged out.")
def clear_command() -> None:
    """Remove every session."""
    click.echo(f"Removed {_run(_ext().clear)} sessions.")


@sessions_cli.command("list")
@click.option("--user", "user_id", required=True, metavar="ID", help="The user's ID.")
def list_command(user_id: str) -> None:
    """List the sessions of a user, newest activity first."""
    infos = _run(lambda: _ext().sessions_of(user_id))
    if not infos:
        click.echo(f"No sessions for user {user_id!r}.")
        return
    rows = [("HANDLE", "CREATED", "LAST SEEN", "ADDRESS", "USER AGENT")]
    for info in infos:
        rows.append(
            (
                info.handle,
                f"{info.created:%Y-%m-%d %H:%M:%S}",
                f"{info.last_seen:%Y-%m-%d %H:%M:%S}",
                info.ip or "-",
                info.user_agent or "-",
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(4)]
    for row in rows:
        cells = [cell.ljust(width) for cell, width in zip(row, widths)]
        click.echo("  ".join([*cells, row[4]]))


@sessions_cli.command("revoke")
@click.argument("handle", required=False)
@click.option("--user", "user_id", metavar="ID", help="End every session of this user.")
def revoke_command(handle: str | None, user_id: str | None) -> None:
    """End the session HANDLE (from 'flask sessions list'), or with --user
    every session of a user."""
    if (handle is None) == (user_id is None):
        raise click.UsageError("Give either a HANDLE or --user ID, not both or neither.")
    if user_id is not None:
        ended = _run(lambda: _ext().revoke_user(user_id))
        click.echo(f"Revoked {ended} sessions of user {user_id!r}.")
        return
    assert handle is not None
    from .users import handle_index_key

    if handle_index_key("", handle) is None:
        raise click.ClickException(
            f"{handle!r} is not a session handle: copy one from"
            " 'flask sessions list --user ID'."
        )
    if not _run(lambda: _ext().revoke(handle)):
        click.echo("No such session.", err=True)
        sys.exit(1)
    click.echo("Revoked 1 session.")


@sessions_cli.command("import-flask-session")
@click.option(
    "--from",
    "source",
    required=True,
    metavar="URL|DIRECTORY",
    help="Flask-Session's store: a redis:// URL, a SQLAlchemy database URL, or"
    " its SESSION_FILE_DIR.",
)
@click.option(
    "--table",
    default="sessions",
    show_default=True,
    help="Flask-Session's SESSION_SQLALCHEMY_TABLE (schema.table with a schema).",
)
@click.option(
    "--prefix",
    default="session:",
    show_default=True,
    help="Flask-Session's SESSION_KEY_PREFIX.",
)
@click.option(
    "--format",
    "format_",
    type=click.Choice(["msgpack", "json"]),
    default="msgpack",
    show_default=True,
    help="Flask-Session's SESSION_SERIALIZATION_FORMAT.",
)
def import_flask_session_command(source: str, table: str, prefix: str, format_: str) -> None:
    """Copy the live sessions Flask-Session 0.8 stored, keeping their IDs.

    Records are read as msgpack or JSON; one that only pickle could read is
    skipped and counted, never unpickled.
    """
    from .migrate import import_sessions
    from .migrate import SourceError

    try:
        result = _run(
            lambda: import_sessions(source, table=table, prefix=prefix, format=format_)
        )
    except SourceError as exc:
        raise click.ClickException(str(exc)) from exc
    click.echo(f"Imported {result.imported} sessions.")
    click.echo(
        f"Skipped {result.expired} expired, {result.unreadable} unreadable and"
        f" {result.present} already in this store."
    )
    if result.too_large:
        click.echo(
            f"Skipped {result.too_large} sessions larger than SESSION_MAX_BYTES="
            f"{_store().max_bytes}."
        )
    if result.bad_id:
        click.echo(
            f"Skipped {result.bad_id} live sessions whose ID is shorter or longer"
            " than this extension accepts (SESSION_ID_LENGTH outside 16 to 64)."
        )
    if result.hashed_id:
        raise click.ClickException(
            f"{result.hashed_id} live sessions were not imported: Flask-Session's"
            " filesystem store keeps only a hash of each session ID. Call"
            " flask_serverside.migrate.adopt_flask_session_files(app, directory)"
            " to take them over as their users come back."
        )


def _store() -> SessionStore:
    """The current app's store, through the extension's public handle."""
    return t.cast("SessionStore", _ext().store)
