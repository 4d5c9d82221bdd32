"""`alignloop keys`: make, list and revoke the chat API's keys (`serving.api_keys`).

    alignloop keys create web-app --scopes chat,feedback   # prints the key, once
    alignloop keys list
    alignloop keys revoke web-app

The key file is ALIGNLOOP_API_KEYS_FILE (default: state_dir/secrets/api_keys.jsonl);
replicas reading it pick changes up within a second. To rotate a key: create a new one,
move the product to it, revoke the old one.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from schemas.settings import Settings
from serving.api_keys import SCOPES, create_key, read_entries, revoke_key

DEFAULT_SCOPES = "chat,feedback"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="alignloop keys", description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    ap.add_argument("--file", type=Path, help="the key file (default: from the settings)")
    sub = ap.add_subparsers(dest="command", required=True)
    create = sub.add_parser("create", help="make a key and print it (shown only this once)")
    create.add_argument("name", help="the principal: 1-64 of letters, digits, - _ . @")
    create.add_argument(
        "--scopes",
        default=DEFAULT_SCOPES,
        help=f"comma-separated, some of {', '.join(SCOPES)} (default: {DEFAULT_SCOPES})",
    )
    sub.add_parser("list", help="names, scopes and creation times (never the keys)")
    revoke = sub.add_parser("revoke", help="remove a key: its callers get 401 within a second")
    revoke.add_argument("name")
    args = ap.parse_args(argv)

    path = args.file or Settings().resolved_api_keys_file()
    try:
        if args.command == "create":
            scopes = [s.strip() for s in args.scopes.split(",") if s.strip()]
            print(create_key(path, args.name, scopes))
        elif args.command == "list":
            for e in read_entries(path):
                line = {"name": e.name, "scopes": sorted(e.scopes), "created_at": e.created_at}
                print(json.dumps(line))
        elif not revoke_key(path, args.name):
            print(f"alignloop keys: no key named {args.name!r} in {path}", file=sys.stderr)
            return 1
    except ValueError as e:
        print(f"alignloop keys: {e}", file=sys.stderr)
        return 2
    return 0
