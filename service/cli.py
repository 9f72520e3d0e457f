"""vibethinker-admin: users, tokens, keys, the audit trail and model conversion, from the server's shell.

Reads the same settings as the service (VIBE_* and VIBE_CONFIG). Any error
exits non-zero with one line on stderr. `tokens issue` prints the token text
once, alone on the last line; nothing stores or logs it.
"""

import argparse
import os
import sys
from datetime import datetime

import sqlalchemy.exc

from auth.errors import StoreError
from auth.keys import KeyFolderError
from service import commands
from service.serving.cache import CacheUnavailable
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
    except (SettingsError, StoreError, KeyFolderError, CacheUnavailable) as exc:
        return _fail(getattr(exc, "message", exc))
    except sqlalchemy.exc.SQLAlchemyError as exc:  # the database is unreachable, locked or not ours
        return _fail(f"database error ({type(exc).__name__}): {_first_line(getattr(exc, 'orig', None) or exc)}")
    except BrokenPipeError:  # the reader went away (`| head`): stop quietly, as Unix tools do
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
    except OSError as exc:  # a folder or file that cannot be read or written
        return _fail(f"{exc.strerror or type(exc).__name__}: {exc.filename or exc}")


def _fail(message):
    print(f"vibethinker-admin: error: {message}", file=sys.stderr)
    return 1


def _first_line(exc):
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]


def build_parser():
    parser = Parser(prog="vibethinker-admin", description=__doc__.split("\n")[0])
    parser.add_argument("--json", action="store_true", help="print JSON for scripts")
    groups = parser.add_subparsers(dest="group", required=True,
                                   metavar="{users,teams,tokens,console-link,keys,transcripts,usage,audit,cache,db,model}")

    users = groups.add_parser("users", help="add, list, disable, enable, set, remove").add_subparsers(dest="cmd", required=True)
    add = users.add_parser("add", help="create a user")
    add.add_argument("name")
    add.add_argument("--admin", action="store_true", help="may hold admin-scope tokens")
    _quota_options(add)
    add.set_defaults(handler=commands.users_add)
    users.add_parser("list", help="list users").set_defaults(handler=commands.users_list)
    for verb, active in (("disable", False), ("enable", True)):
        cmd = users.add_parser(verb, help=f"{verb} a user (all their tokens {'work again' if active else 'stop'})")
        cmd.add_argument("name")
        cmd.set_defaults(handler=commands.users_toggle, active=active)
    set_ = users.add_parser("set", help="change quotas or the admin flag ('none' clears a quota)")
    set_.add_argument("name")
    set_.add_argument("--admin", action=argparse.BooleanOptionalAction, default=None)
    set_.add_argument("--transcripts", choices=["on", "off"], help="keep this user's generations (encrypted, "
                      "read by admins only, purged after transcript_retention)")
    _quota_options(set_, clearable=True)
    set_.set_defaults(handler=commands.users_set)
    remove = users.add_parser("remove", help="delete a user with their tokens, console sessions and transcripts "
                              "(their files and open batches first); usage and the audit trail stay")
    remove.add_argument("name")
    remove.set_defaults(handler=commands.users_remove)

    teams = groups.add_parser("teams", help="add, list, set, members, remove: limits a team's members share")
    teams = teams.add_subparsers(dest="cmd", required=True)
    team_add = teams.add_parser("add", help="create a team")
    team_add.add_argument("name")
    _team_options(team_add)
    team_add.set_defaults(handler=commands.teams_add)
    teams.add_parser("list", help="list teams, their limits and members").set_defaults(handler=commands.teams_list)
    team_set = teams.add_parser("set", help="change a team's limits ('none' clears one)")
    team_set.add_argument("name")
    _team_options(team_set, clearable=True)
    team_set.set_defaults(handler=commands.teams_set)
    members = teams.add_parser("members", help="show a team's members, or add and remove some (a user is in one "
                                               "team at most)")
    members.add_argument("name")
    members.add_argument("--add", action="append", default=[], metavar="USER", help="repeat for more")
    members.add_argument("--remove", action="append", default=[], metavar="USER", help="repeat for more")
    members.set_defaults(handler=commands.teams_members)
    team_remove = teams.add_parser("remove", help="delete a team (its members stay, in no team)")
    team_remove.add_argument("name")
    team_remove.set_defaults(handler=commands.teams_remove)

    tokens = groups.add_parser("tokens", help="issue, list, revoke, rotate").add_subparsers(dest="cmd", required=True)
    issue = tokens.add_parser("issue", help="issue a token; the last line printed is the token")
    issue.add_argument("name")
    issue.add_argument("--ttl", help="lifetime such as 30d, 12h, 90m (default from settings)")
    issue.add_argument("--scope", default="generate", help="generate, admin, or generate,admin")
    issue.add_argument("--label", default="", help="what the token is for")
    issue.set_defaults(handler=commands.tokens_issue)
    list_ = tokens.add_parser("list", help="list live tokens (never their text)")
    list_.add_argument("--user")
    list_.add_argument("--all", action="store_true", help="include revoked and expired tokens")
    list_.set_defaults(handler=commands.tokens_list)
    revoke = tokens.add_parser("revoke", help="revoke one token by jti")
    revoke.add_argument("jti")
    revoke.set_defaults(handler=commands.tokens_revoke)
    rotate = tokens.add_parser("rotate", help="issue a successor to a token; the old one works until the grace "
                               "ends; the last line printed is the new token")
    rotate.add_argument("jti")
    rotate.add_argument("--grace", required=True, help="how long the old token keeps working: 0 (revoked at once), "
                        "or such as 24h, 7d (at most 30d, never past its own expiry)")
    rotate.set_defaults(handler=commands.tokens_rotate)
    revoke_all = tokens.add_parser("revoke-all", help="revoke every token of a user")
    revoke_all.add_argument("name")
    revoke_all.set_defaults(handler=commands.tokens_revoke_all)

    link = groups.add_parser("console-link", help="print a one-time sign-in link to the admins' console")
    link.add_argument("name", help="the admin it signs in")
    link.set_defaults(handler=commands.console_link)

    key_cmds = groups.add_parser("keys", help="generate, rotate, retire, list").add_subparsers(
        dest="cmd", required=True
    )
    key_cmds.add_parser("generate", help="make the first signing key").set_defaults(handler=commands.keys_change, op="generate")
    key_cmds.add_parser("rotate", help="add a new signing key").set_defaults(handler=commands.keys_change, op="rotate")
    retire = key_cmds.add_parser("retire", help="delete a key; tokens it signed stop working")
    retire.add_argument("kid")
    retire.set_defaults(handler=commands.keys_change, op="retire")
    key_cmds.add_parser("list", help="list key ids, newest (signing) last").set_defaults(handler=commands.keys_list)
    key_cmds.add_parser("transcripts", help="make the transcripts' key if there is none (never replaces one)"
                        ).set_defaults(handler=commands.keys_transcripts)

    kept = groups.add_parser("transcripts", help="export, list, purge").add_subparsers(dest="cmd", required=True)
    export = kept.add_parser("export", help="transcripts as JSONL (audited): chat for fine-tuning, eval for scoring")
    export.add_argument("--since", type=_date, required=True, help="YYYY-MM-DD")
    export.add_argument("--user", help="only this user's")
    export.add_argument("--team", help="only requests that counted against this team")
    export.add_argument("--format", choices=["chat", "eval"], default="chat",
                        help="chat: OpenAI's fine-tuning messages, successful answers only, the reasoning in "
                        "<think>...</think> before the answer; eval: question, final and expected answer, correct")
    export.add_argument("--output", help="a file to write (mode 0600); default: stdout")
    export.set_defaults(handler=commands.transcripts_export)
    listing = kept.add_parser("list", help="transcripts' metadata, newest first (no content)")
    listing.add_argument("--user")
    listing.add_argument("--team", help="only requests that counted against this team")
    listing.add_argument("--since", type=_date, help="YYYY-MM-DD")
    listing.add_argument("--limit", type=int, default=100)
    listing.set_defaults(handler=commands.transcripts_list)
    kept.add_parser("purge", help="delete transcripts past transcript_retention (the service also does, hourly)"
                    ).set_defaults(handler=commands.transcripts_purge)

    usage = groups.add_parser("usage", help="daily usage per user (or per team), newest first")
    usage.add_argument("--user")
    usage.add_argument("--team", help="only requests that counted against this team")
    usage.add_argument("--by-team", action="store_true", help="one row per team and day")
    usage.add_argument("--since", type=_date, help="YYYY-MM-DD")
    usage.set_defaults(handler=commands.usage_list)

    audit = groups.add_parser("audit", help="list admin actions, newest first")
    for name in ("actor", "action", "target"):
        audit.add_argument(f"--{name}")
    audit.add_argument("--since", type=_date, help="YYYY-MM-DD")
    audit.add_argument("--limit", type=int, default=100)
    audit.set_defaults(handler=commands.audit_list)

    cache = groups.add_parser("cache", help="the response cache").add_subparsers(dest="cmd", required=True)
    purge = cache.add_parser("purge", help="drop cached answers (all, or a user's, or a model's)")
    purge.add_argument("--user", help="only this user's answers")
    purge.add_argument("--model", help="only this model's answers (a served name or alias)")
    purge.set_defaults(handler=commands.cache_purge)

    db = groups.add_parser("db", help="database schema, backup and restore").add_subparsers(dest="cmd", required=True)
    db.add_parser("upgrade", help="apply migrations (the service also does at start)").set_defaults(handler=commands.db_upgrade)
    back = db.add_parser("backup", help="write a consistent backup while the service runs (SQLite's online "
                         "backup API, or pg_dump)")
    back.add_argument("file", nargs="?", help="the backup file to write")
    back.add_argument("--into", help="a folder: a timestamped backup there, older ones pruned (the nightly timer)")
    back.add_argument("--keep", type=int, default=14, help="with --into: how many backups to keep (default 14)")
    back.set_defaults(handler=commands.db_backup)
    restore = db.add_parser("restore", help="replace the database with a backup (stop the service first); "
                            "revocations made since the backup are kept")
    restore.add_argument("file")
    restore.set_defaults(handler=commands.db_restore)

    model = groups.add_parser("model", help="convert").add_subparsers(dest="cmd", required=True)
    convert = model.add_parser("convert", help="write a pre-converted model folder the service loads directly "
                               "(again only when the source's files change)")
    convert.add_argument("source", help="a model folder (config.json, safetensors weights, tokenizer)")
    convert.add_argument("out", help="the folder to write (or bring up to date); point model_path at it")
    convert.add_argument("--quantization", choices=["int8"], required=True)
    convert.set_defaults(handler=commands.model_convert)
    return parser


def _team_options(parser, clearable=False):
    number = (lambda v: None if v == "none" else int(v)) if clearable else int
    parser.add_argument("--transcripts", choices=["on", "off"], default=argparse.SUPPRESS,
                        help="keep the members' generations (encrypted, admins read them), whatever their own flag")
    parser.add_argument("--rate-limit", type=(lambda v: None if v == "none" else v) if clearable else str,
                        default=argparse.SUPPRESS, help='requests of all members together, e.g. "600/minute"')
    parser.add_argument("--daily-tokens", type=number, default=argparse.SUPPRESS,
                        help="prompt+completion tokens of all members together a day")
    parser.add_argument("--max-concurrent", type=number, default=argparse.SUPPRESS,
                        help="simultaneous requests of all members together")


def _quota_options(parser, clearable=False):
    kind = (lambda v: None if v == "none" else v) if clearable else str
    number = (lambda v: None if v == "none" else int(v)) if clearable else int
    parser.add_argument("--rate-limit", type=kind, default=argparse.SUPPRESS, help='e.g. "60/minute;2000/day"')
    parser.add_argument("--daily-tokens", type=number, default=argparse.SUPPRESS, help="prompt+completion tokens a day")
    parser.add_argument("--max-concurrent", type=number, default=argparse.SUPPRESS, help="simultaneous requests")
    parser.add_argument("--max-files", type=number, default=argparse.SUPPRESS, help="files stored at once")
    parser.add_argument("--max-stored-bytes", type=number, default=argparse.SUPPRESS, help="bytes of files stored")
    parser.add_argument("--max-open-batches", type=number, default=argparse.SUPPRESS, help="batches open at once")
    parser.add_argument("--daily-batches", type=number, default=argparse.SUPPRESS, help="batches created a day")
    parser.add_argument(
        "--allow-system-prompt",
        dest="system_prompts",
        action="append",
        default=argparse.SUPPRESS,
        help="a system prompt this user may send (repeat for more); others are refused",
    )
    parser.add_argument("--allow-model", dest="models", action="append", default=argparse.SUPPRESS,
                        help="a model (name or alias) this user may call (repeat for more); others get 403")
    if clearable:
        parser.add_argument(
            "--any-system-prompt",
            dest="system_prompts",
            action="store_const",
            const=None,
            default=argparse.SUPPRESS,
            help="lift the system-prompt allow-list",
        )
        parser.add_argument("--any-model", dest="models", action="store_const", const=None,
                            default=argparse.SUPPRESS, help="lift the model allow-list")


def _date(text):
    try:
        return datetime.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a date: {text!r} (use YYYY-MM-DD)") from None


if __name__ == "__main__":
    sys.exit(main())
