"""vibethinker-admin: users, tokens, keys, the audit trail and model conversion, from the server's shell.

Reads the same settings as the service (VIBE_* and VIBE_CONFIG). Any error
exits non-zero with one line on stderr. `tokens issue` prints the token text
once, alone on the last line; nothing stores or logs it.
"""

import argparse
import getpass
import json
import os
import sys
from datetime import datetime
from pathlib import Path

import sqlalchemy.exc

from auth import keys
from auth.errors import StoreError
from auth.keys import KeyFolderError
from auth.schema import connect, migrate, revision
from auth.store import QUOTA_FIELDS, Store
from auth.tokens import issue_token
from service.admission.counters import epoch_publisher, open_counters
from service.settings import SettingsError, load_settings


class Parser(argparse.ArgumentParser):
    """argparse, with its usage errors in one line as every other error here (`--help` shows the usage)."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def main(argv=None):
    args = build_parser().parse_args(argv)
    try:
        settings = load_settings()
        return args.handler(args, settings) or 0
    except (SettingsError, StoreError, KeyFolderError) as exc:
        return _fail(getattr(exc, "message", exc))
    except sqlalchemy.exc.SQLAlchemyError as exc:  # the database is unreachable, locked or not ours
        return _fail(f"database error ({type(exc).__name__}): {_first_line(getattr(exc, 'orig', None) or exc)}")
    except BrokenPipeError:  # the reader went away (`| head`): stop quietly, as Unix tools do
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
    except OSError as exc:  # a folder or file that cannot be read or written
        return _fail(f"{exc.strerror or type(exc).__name__}: {exc.filename or exc}")


def _store(settings):
    """The store, telling the running service's workers (through Redis) when access changes."""
    warn = lambda message: print(f"vibethinker-admin: warning: {message}", file=sys.stderr)  # noqa: E731
    return Store(settings.db_url, publish=epoch_publisher(open_counters(settings.ratelimit_storage_uri), warn))


def _fail(message):
    print(f"vibethinker-admin: error: {message}", file=sys.stderr)
    return 1


def _first_line(exc):
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]


def build_parser():
    parser = Parser(prog="vibethinker-admin", description=__doc__.split("\n")[0])
    parser.add_argument("--json", action="store_true", help="print JSON for scripts")
    groups = parser.add_subparsers(dest="group", required=True, metavar="{users,tokens,keys,usage,audit,db,model}")

    users = groups.add_parser("users", help="add, list, disable, enable, set").add_subparsers(dest="cmd", required=True)
    add = users.add_parser("add", help="create a user")
    add.add_argument("name")
    add.add_argument("--admin", action="store_true", help="may hold admin-scope tokens")
    _quota_options(add)
    add.set_defaults(handler=users_add)
    users.add_parser("list", help="list users").set_defaults(handler=users_list)
    for verb, active in (("disable", False), ("enable", True)):
        cmd = users.add_parser(verb, help=f"{verb} a user (all their tokens {'work again' if active else 'stop'})")
        cmd.add_argument("name")
        cmd.set_defaults(handler=users_toggle, active=active)
    set_ = users.add_parser("set", help="change quotas or the admin flag ('none' clears a quota)")
    set_.add_argument("name")
    set_.add_argument("--admin", action=argparse.BooleanOptionalAction, default=None)
    _quota_options(set_, clearable=True)
    set_.set_defaults(handler=users_set)

    tokens = groups.add_parser("tokens", help="issue, list, revoke").add_subparsers(dest="cmd", required=True)
    issue = tokens.add_parser("issue", help="issue a token; the last line printed is the token")
    issue.add_argument("name")
    issue.add_argument("--ttl", help="lifetime such as 30d, 12h, 90m (default from settings)")
    issue.add_argument("--scope", default="generate", help="generate, admin, or generate,admin")
    issue.add_argument("--label", default="", help="what the token is for")
    issue.set_defaults(handler=tokens_issue)
    list_ = tokens.add_parser("list", help="list live tokens (never their text)")
    list_.add_argument("--user")
    list_.add_argument("--all", action="store_true", help="include revoked and expired tokens")
    list_.set_defaults(handler=tokens_list)
    revoke = tokens.add_parser("revoke", help="revoke one token by jti")
    revoke.add_argument("jti")
    revoke.set_defaults(handler=tokens_revoke)
    revoke_all = tokens.add_parser("revoke-all", help="revoke every token of a user")
    revoke_all.add_argument("name")
    revoke_all.set_defaults(handler=tokens_revoke_all)

    key_cmds = groups.add_parser("keys", help="generate, rotate, retire, list").add_subparsers(
        dest="cmd", required=True
    )
    key_cmds.add_parser("generate", help="make the first signing key").set_defaults(handler=keys_change, op="generate")
    key_cmds.add_parser("rotate", help="add a new signing key").set_defaults(handler=keys_change, op="rotate")
    retire = key_cmds.add_parser("retire", help="delete a key; tokens it signed stop working")
    retire.add_argument("kid")
    retire.set_defaults(handler=keys_change, op="retire")
    key_cmds.add_parser("list", help="list key ids, newest (signing) last").set_defaults(handler=keys_list)

    usage = groups.add_parser("usage", help="daily usage per user, newest first")
    usage.add_argument("--user")
    usage.add_argument("--since", type=_date, help="YYYY-MM-DD")
    usage.set_defaults(handler=usage_list)

    audit = groups.add_parser("audit", help="list admin actions, newest first")
    for name in ("actor", "action", "target"):
        audit.add_argument(f"--{name}")
    audit.add_argument("--since", type=_date, help="YYYY-MM-DD")
    audit.add_argument("--limit", type=int, default=100)
    audit.set_defaults(handler=audit_list)

    db = groups.add_parser("db", help="database schema").add_subparsers(dest="cmd", required=True)
    db.add_parser("upgrade", help="apply migrations (the service also does at start)").set_defaults(handler=db_upgrade)

    model = groups.add_parser("model", help="convert").add_subparsers(dest="cmd", required=True)
    convert = model.add_parser("convert", help="write a pre-converted model folder the service loads directly "
                               "(again only when the source's files change)")
    convert.add_argument("source", help="a model folder (config.json, safetensors weights, tokenizer)")
    convert.add_argument("out", help="the folder to write (or bring up to date); point model_path at it")
    convert.add_argument("--quantization", choices=["int8"], required=True)
    convert.set_defaults(handler=model_convert)
    return parser


def _quota_options(parser, clearable=False):
    kind = (lambda v: None if v == "none" else v) if clearable else str
    number = (lambda v: None if v == "none" else int(v)) if clearable else int
    parser.add_argument("--rate-limit", type=kind, default=argparse.SUPPRESS, help='e.g. "60/minute;2000/day"')
    parser.add_argument("--daily-tokens", type=number, default=argparse.SUPPRESS, help="prompt+completion tokens a day")
    parser.add_argument("--max-concurrent", type=number, default=argparse.SUPPRESS, help="simultaneous requests")
    parser.add_argument(
        "--allow-system-prompt",
        dest="system_prompts",
        action="append",
        default=argparse.SUPPRESS,
        help="a system prompt this user may send (repeat for more); others are refused",
    )
    if clearable:
        parser.add_argument(
            "--any-system-prompt",
            dest="system_prompts",
            action="store_const",
            const=None,
            default=argparse.SUPPRESS,
            help="lift the system-prompt allow-list",
        )


def _quotas(args):
    return {k: getattr(args, k) for k in QUOTA_FIELDS if hasattr(args, k)}


def _date(text):
    try:
        return datetime.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a date: {text!r} (use YYYY-MM-DD)") from None


def _who():
    return {"actor": f"cli:{getpass.getuser()}"[:64], "source": "cli"}


def _emit(args, data, text):
    print(json.dumps(data, default=str) if args.json else text)


def users_add(args, settings):
    user = _store(settings).add_user(args.name, args.admin, **_quotas(args), **_who())
    _emit(args, user, f"added user {user['name']}{' (admin)' if user['admin'] else ''}")


def users_list(args, settings):
    rows = _store(settings).list_users()
    _emit(args, rows, _table(rows, ("name", "admin", "active", "rate_limit", "daily_tokens", "max_concurrent")))


def users_toggle(args, settings):
    _store(settings).update_user(args.name, active=args.active, **_who())
    _emit(args, {"name": args.name, "active": args.active}, f"{'enabled' if args.active else 'disabled'} {args.name}")


def users_set(args, settings):
    changes = _quotas(args)
    if args.admin is not None:
        changes["is_admin"] = args.admin
    if not changes:
        raise StoreError(400, "nothing to change: give --admin/--no-admin or a quota option", "empty")
    user = _store(settings).update_user(args.name, **changes, **_who())
    _emit(args, user, f"updated {args.name}")


def tokens_issue(args, settings):
    text, meta = issue_token(
        _store(settings),
        keys.KeySet(settings.jwt_key_dir),
        args.name,
        scope=args.scope,
        ttl=args.ttl or settings.token_ttl,
        max_ttl=settings.token_max_ttl,
        label=args.label,
        issuer=settings.jwt_issuer,
        audience=settings.jwt_audience,
        **_who(),
    )
    _emit(
        args,
        meta,
        f"issued token {meta['jti']} for {meta['user']} (scope {meta['scope']}, expires "
        f"{meta['expires_at']}); it is shown once, store it now:",
    )
    print(text)


def tokens_list(args, settings):
    rows = _store(settings).list_tokens(args.user, include_inactive=args.all)
    _emit(args, rows, _table(rows, ("jti", "user", "scope", "label", "expires_at", "revoked_at")))


def tokens_revoke(args, settings):
    token = _store(settings).revoke_token(args.jti, **_who())
    _emit(args, token, f"revoked {token['jti']} ({token['user']})")


def tokens_revoke_all(args, settings):
    count = _store(settings).revoke_all(args.name, **_who())
    _emit(args, {"user": args.name, "revoked": count}, f"revoked {count} token(s) of {args.name}")


def keys_change(args, settings):
    if args.op == "retire":
        keys.retire(settings.jwt_key_dir, args.kid)
        kid = args.kid
    else:
        kid = getattr(keys, args.op)(settings.jwt_key_dir)
    _store(settings).record_event(f"key.{args.op}", kid, {}, changes_access=args.op == "retire", **_who())
    _emit(
        args,
        {"op": args.op, "kid": kid, "key_dir": str(settings.jwt_key_dir)},
        f"{args.op}: {kid} in {settings.jwt_key_dir}",
    )


def keys_list(args, settings):
    kids = keys.list_kids(settings.jwt_key_dir)
    _emit(args, kids, "\n".join(f"{kid}{'  (signing)' if kid == kids[-1] else ''}" for kid in kids))


def usage_list(args, settings):
    store = _store(settings)
    if args.user is not None:
        store.get_user(args.user)  # an unknown user is an error, not an empty table
    rows = store.usage_by_day(args.user, args.since)
    _emit(
        args,
        rows,
        _table(rows, ("day", "user", "requests", "succeeded", "prompt_tokens", "completion_tokens", "total_tokens")),
    )


def audit_list(args, settings):
    rows = _store(settings).list_audit(
        actor=args.actor, action=args.action, target=args.target, since=args.since, limit=args.limit
    )
    _emit(args, rows, _table(rows, ("at", "actor", "action", "target", "source", "detail")))


def db_upgrade(args, settings):
    engine = connect(settings.db_url)
    before = revision(engine)
    migrate(engine)
    after = revision(engine)
    engine.dispose()
    text = f"database schema upgraded from {before or 'empty'} to {after}" if before != after else (
        f"database schema is up to date ({after})")
    _emit(args, {"upgraded": before != after, "from": before, "to": after}, text)


def model_convert(args, settings):
    import torch

    from service.inference import artifact, convert

    torch.set_num_threads(settings.torch_threads)
    try:
        written = convert.convert(args.source, args.out, args.quantization)
    except artifact.ConvertError as exc:
        raise SettingsError(str(exc)) from None
    size = (Path(args.out) / artifact.WEIGHTS).stat().st_size
    done = "wrote" if written else "up to date:"
    _emit(args, {"out": args.out, "quantization": args.quantization, "written": written, "weight_bytes": size},
          f"{done} {args.out} ({args.quantization}, {size / 2**20:,.0f} MiB of weights); set model_path to it "
          f"and quantization = {args.quantization}")


def _table(rows, columns):
    cells = [[str(r.get(c) if r.get(c) is not None else "-") for c in columns] for r in rows]
    widths = [max([len(c)] + [len(row[i]) for row in cells]) for i, c in enumerate(columns)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(columns, widths))]
    lines += ["  ".join(v.ljust(w) for v, w in zip(row, widths)) for row in cells]
    return "\n".join(line.rstrip() for line in lines)


if __name__ == "__main__":
    sys.exit(main())
