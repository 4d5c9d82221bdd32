"""``alignloop db``: the schema and the components' database roles (docs/deploy.md,
"Database roles").

    alignloop db migrate                      apply pending migrations, refresh the grants
    alignloop db roles [--prefix P] [--create] [--show]
                                              record the group roles P_serving, P_ingest,
                                              P_trainer, P_controller and grant them exactly
                                              their privileges (--create makes them NOLOGIN)
    alignloop db login NAME --component C [--password-env VAR | --password-file F]
                                              a LOGIN role NAME in C's group role

``migrate``, ``roles`` and ``login`` connect with the owner's URL (``--database-url`` or
ALIGNLOOP_DATABASE_URL): the role that owns the tables; ``roles --create`` and ``login``
also need CREATEROLE. ``roles --show`` prints the table of privileges and connects nowhere.
Exit status: 0 done, 1 refused (the message says why), 2 usage.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import psycopg

from schemas import db_roles


def _parser() -> argparse.ArgumentParser:
    from schemas.settings import Settings

    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--database-url", default=Settings().database_url, help="the owner's URL")
    ap = argparse.ArgumentParser(prog="alignloop db", description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="command", required=True)
    sub.add_parser("migrate", parents=[common], help="apply pending migrations (the owner)")
    roles = sub.add_parser("roles", parents=[common], help="group roles and their grants")
    roles.add_argument("--prefix", default="alignloop", help="role names: PREFIX_COMPONENT")
    roles.add_argument("--create", action="store_true", help="create missing group roles")
    roles.add_argument("--show", action="store_true", help="print the privileges and exit")
    login = sub.add_parser("login", parents=[common], help="a LOGIN role in a group role")
    login.add_argument("name")
    login.add_argument("--component", required=True, choices=db_roles.COMPONENTS)
    secret = login.add_mutually_exclusive_group()
    secret.add_argument("--password-env", metavar="VAR", help="read the password from $VAR")
    secret.add_argument("--password-file", type=Path, help="read the password from a file")
    return ap


def privilege_table() -> list[str]:
    """One line per (table, component) with privileges: the table ``roles --show`` prints."""
    lines = []
    for table in db_roles.GRANTS:
        held = [
            f"{c}: {', '.join(db_roles.privileges(table, c))}"
            for c in db_roles.COMPONENTS
            if db_roles.privileges(table, c)
        ]
        lines.append(f"{table:<24} {'; '.join(held) or '(owner only)'}")
    return lines


def _password(args: argparse.Namespace) -> str | None:
    if args.password_env:
        value = os.environ.get(args.password_env)
        if not value:
            raise ValueError(f"${args.password_env} is empty or unset")
        return value
    if args.password_file:
        return str(args.password_file.read_text(encoding="utf-8")).rstrip("\n")
    return None


def _run(conn: psycopg.Connection, args: argparse.Namespace) -> int:
    from feedback.db import apply_grants, create_login, migrate, register_roles

    if args.command == "migrate":
        applied = migrate(conn)
        apply_grants(conn)  # also when nothing was pending: a release may change the grants
        print(f"applied {applied}" if applied else "the schema is up to date")
    elif args.command == "roles":
        made = register_roles(conn, args.prefix, create=args.create)
        for component, role in made.items():
            print(f"{component:<11} {role}  ({db_roles.PROCESSES[component]})")
    else:
        group = create_login(conn, args.name, args.component, _password(args))
        print(f"{args.name}: LOGIN, member of {group}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """``alignloop db COMMAND``."""
    args = _parser().parse_args(sys.argv[1:] if argv is None else argv)
    if args.command == "roles" and args.show:
        print("\n".join(privilege_table()))
        return 0
    if not args.database_url:
        print("alignloop db: set ALIGNLOOP_DATABASE_URL or --database-url", file=sys.stderr)
        return 2
    from feedback.db import MigrationRefused, connect

    try:
        with connect(args.database_url, autocommit=True) as conn:
            return _run(conn, args)
    except (MigrationRefused, LookupError, ValueError, OSError, psycopg.Error) as exc:
        print(f"alignloop db {args.command}: {exc}", file=sys.stderr)
        return 1
