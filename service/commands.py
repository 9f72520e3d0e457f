"""What each vibethinker-admin command does; service.cli parses the command line and reports errors.

Each handler takes the parsed arguments and the settings, calls auth/ (or the
model conversion), and prints a table or, with --json, JSON. Changes are
audited with `cli:<login>` as actor; every change to who may do what is
published to Redis, so running workers drop their cached tokens at once.
"""

import getpass
import json
import os
import sys
from pathlib import Path

from auth import backup, keys
from auth.console import ConsoleAccess
from auth.errors import StoreError
from auth.schema import connect, migrate, revision
from auth.store import QUOTA_FIELDS, TEAM_FIELDS, Store
from auth.tokens import issue_token, parse_duration, rotate_token
from auth.transcripts import Transcripts
from service.admission.counters import epoch_publisher, open_counters
from service.settings import SettingsError


def _store(settings):
    """The store, telling the running service's workers (through Redis) when access changes."""
    return Store(settings.db_url, publish=_publisher(settings))


def _publisher(settings):
    warn = lambda message: print(f"vibethinker-admin: warning: {message}", file=sys.stderr)  # noqa: E731
    return epoch_publisher(open_counters(settings.ratelimit_storage_uri), warn)


def _quotas(args):
    return {k: getattr(args, k) for k in QUOTA_FIELDS if hasattr(args, k)}


def _who():
    return {"actor": f"cli:{getpass.getuser()}"[:64], "source": "cli"}


def _emit(args, data, text):
    print(json.dumps(data, default=str) if args.json else text)


def users_add(args, settings):
    user = _store(settings).add_user(args.name, args.admin, **_quotas(args), **_who())
    _emit(args, user, f"added user {user['name']}{' (admin)' if user['admin'] else ''}")


def users_list(args, settings):
    rows = _store(settings).list_users()
    _emit(args, rows, _table(rows, ("name", "admin", "active", "team", "rate_limit", "daily_tokens", "max_concurrent")))


def users_toggle(args, settings):
    _store(settings).update_user(args.name, active=args.active, **_who())
    _emit(args, {"name": args.name, "active": args.active}, f"{'enabled' if args.active else 'disabled'} {args.name}")


def users_set(args, settings):
    changes = _quotas(args)
    if args.admin is not None:
        changes["is_admin"] = args.admin
    if args.transcripts is not None:
        changes["transcripts"] = args.transcripts == "on"
    if not changes:
        raise StoreError(400, "nothing to change: give --admin/--no-admin, --transcripts or a quota option", "empty")
    user = _store(settings).update_user(args.name, **changes, **_who())
    _emit(args, user, f"updated {args.name}")


def users_remove(args, settings):
    from service.batches.quotas import release_user

    gone = _store(settings).remove_user(args.name, release=release_user, **_who())
    _emit(args, {"name": args.name, "removed": True, **gone},
          f"removed {args.name}: {gone['tokens']} token(s), {gone['transcripts']} transcript(s), "
          f"{gone['batches']} finished batch(es); their usage rows and the audit trail stay")


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


def tokens_rotate(args, settings):
    text, meta = rotate_token(_store(settings), keys.KeySet(settings.jwt_key_dir), args.jti, grace=args.grace,
                              max_ttl=settings.token_max_ttl, issuer=settings.jwt_issuer,
                              audience=settings.jwt_audience, **_who())
    _emit(args, meta, f"rotated {meta['replaces']}: it works until {meta['grace_ends_at']}; its successor "
          f"{meta['jti']} for {meta['user']} (scope {meta['scope']}, expires {meta['expires_at']}) is shown once, "
          "store it now:")
    print(text)


def tokens_list(args, settings):
    rows = _store(settings).list_tokens(args.user, include_inactive=args.all)
    _emit(args, rows, _table(rows, ("jti", "user", "scope", "label", "expires_at", "status", "revoked_at",
                                    "replaces", "replaced_by")))


def tokens_revoke(args, settings):
    token = _store(settings).revoke_token(args.jti, **_who())
    _emit(args, token, f"revoked {token['jti']} ({token['user']})")


def tokens_revoke_all(args, settings):
    count = _store(settings).revoke_all(args.name, **_who())
    _emit(args, {"user": args.name, "revoked": count}, f"revoked {count} token(s) of {args.name}")


def console_link(args, settings):
    """A one-time link that signs admin NAME in to the console (the link is the secret: it is printed once)."""
    ttl = parse_duration(settings.console_link_ttl)
    secret = ConsoleAccess(_store(settings)).issue_link(args.name, ttl, **_who())
    url = f"{settings.console_base}/admin/console/login/link/{secret}"
    _emit(args, {"user": args.name, "url": url, "expires_in_s": int(ttl.total_seconds())},
          f"a sign-in link for {args.name}, working once within {settings.console_link_ttl}:\n{url}")


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


def keys_transcripts(args, settings):
    """The transcripts' key: made if there is none (a server set up before transcripts), never replaced."""
    had = keys.transcript_kids(settings.jwt_key_dir)
    kid = keys.transcript_key(settings.jwt_key_dir)
    if not had:
        _store(settings).record_event("key.transcripts", kid, {}, **_who())
    _emit(args, {"kid": kid, "created": not had, "key_dir": str(settings.jwt_key_dir)},
          f"{'made' if not had else 'kept'} the transcripts key {kid} in {settings.jwt_key_dir}")


def transcripts_export(args, settings):
    """Transcripts since a date as JSONL (chat: OpenAI's fine-tuning format; eval: one line per answer), to a
    file of mode 0600 or stdout; audited with the count."""
    from service.serving.export import lines

    store = _store(settings)
    if args.user is not None:
        store.get_user(args.user)  # an unknown user is an error, not an empty export
    if args.team is not None:
        store.get_team(args.team)
    found = Transcripts(store, settings.jwt_key_dir).export(args.since, args.user, team=args.team, **_who())
    text = "".join(json.dumps(line, ensure_ascii=False) + "\n" for line in lines(found, args.format))
    if args.output is None:
        sys.stdout.write(text)
        return
    handle = os.open(args.output, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(handle, "w", encoding="utf-8") as out:
        out.write(text)
    print(f"exported {text.count(chr(10))} line(s) from {len(found)} transcript(s) to {args.output}",
          file=sys.stderr)


def transcripts_purge(args, settings):
    retention = settings.transcript_retention_delta
    count = Transcripts(_store(settings), settings.jwt_key_dir).purge(retention)
    _emit(args, {"purged": count, "retention": settings.transcript_retention},
          f"purged {count} transcript(s) older than {settings.transcript_retention}")


def transcripts_list(args, settings):
    rows = Transcripts(_store(settings), settings.jwt_key_dir).list(args.user, args.since, limit=args.limit,
                                                                    team=args.team)
    _emit(args, rows, _table(rows, ("id", "created_at", "user", "team", "model", "route", "status", "request_id")))


def keys_list(args, settings):
    kids = keys.list_kids(settings.jwt_key_dir)
    _emit(args, kids, "\n".join(f"{kid}{'  (signing)' if kid == kids[-1] else ''}" for kid in kids))


def teams_add(args, settings):
    team = _store(settings).add_team(args.name, **_team_limits(args), **_who())
    _emit(args, team, f"added team {team['name']}")


def teams_list(args, settings):
    rows = _store(settings).list_teams()
    shown = [{**row, "members": ",".join(row["members"])} for row in rows]
    _emit(args, rows, _table(shown, ("name", *TEAM_FIELDS, "transcripts", "members")))


def teams_set(args, settings):
    changes = _team_limits(args)
    if not changes:
        raise StoreError(400, "nothing to change: give --rate-limit, --daily-tokens, --max-concurrent or "
                         "--transcripts", "empty")
    team = _store(settings).update_team(args.name, **changes, **_who())
    _emit(args, team, f"updated team {args.name}")


def teams_members(args, settings):
    store = _store(settings)
    if args.add or args.remove:
        team = store.set_members(args.name, add=args.add, remove=args.remove, **_who())
    else:
        team = store.get_team(args.name)
    _emit(args, team["members"], "\n".join(team["members"]) or f"team {args.name} has no members")


def teams_remove(args, settings):
    team = _store(settings).remove_team(args.name, **_who())
    _emit(args, team, f"removed team {args.name} ({len(team['members'])} member(s) now in no team)")


def _team_limits(args):
    fields = {k: getattr(args, k) for k in TEAM_FIELDS if hasattr(args, k)}
    if hasattr(args, "transcripts"):
        fields["transcripts"] = args.transcripts == "on"
    return fields


def usage_list(args, settings):
    store = _store(settings)
    if args.user is not None:
        store.get_user(args.user)  # an unknown user is an error, not an empty table
    if args.team is not None:
        store.get_team(args.team)
    by = "team" if args.by_team else "user"
    rows = store.usage_by_day(args.user, args.since, team=args.team, by=by)
    _emit(
        args,
        rows,
        _table(rows, ("day", by, "requests", "succeeded", "cached", "prompt_tokens", "completion_tokens",
                      "total_tokens")),
    )


def cache_purge(args, settings):
    from service.serving import cache

    if cache.storage_uri(settings).startswith("memory://"):
        raise SettingsError("the cache lives inside the service process (memory:// storage): use "
                            "POST /admin/cache/purge, or restart the service")
    store = _store(settings)
    if args.user is not None:
        store.get_user(args.user)  # an unknown user is an error, not "0 purged"
    model = cache.served_name(settings, args.model)
    count = cache.purge(cache.Cache(cache.RedisAnswers(cache.storage_uri(settings)), 1, 1), store, args.user,
                        model, **_who())
    _emit(args, {"purged": count}, f"purged {count} cached answer(s)")


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


def db_backup(args, settings):
    if args.into is not None:
        result = backup.backup_into(settings.db_url, args.into, args.keep)
    elif args.file is not None:
        result = backup.backup(settings.db_url, args.file)
    else:
        raise SettingsError("give a FILE, or --into FOLDER (with --keep N)")
    gone = f"; removed {len(result['removed'])} older backup(s)" if result.get("removed") else ""
    _emit(args, result, f"backed up the {result['kind']} database to {result['path']} ({result['bytes']} bytes, "
          f"{result['seconds']} s){gone}")


def db_restore(args, settings):
    result = backup.restore(settings.db_url, args.file, publish=_publisher(settings))
    _store(settings).record_event("db.restore", Path(args.file).name, {"revocations_kept": result["revocations_kept"]},
                                  **_who())
    _emit(args, result, f"restored the {result['kind']} database from {args.file} (schema {result['schema']}); "
          f"{result['revocations_kept']} token revocation(s) made since the backup kept")


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
    cells = [[_printable(str(r.get(c) if r.get(c) is not None else "-")) for c in columns] for r in rows]
    widths = [max([len(c)] + [len(row[i]) for row in cells]) for i, c in enumerate(columns)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(columns, widths))]
    lines += ["  ".join(v.ljust(w) for v, w in zip(row, widths)) for row in cells]
    return "\n".join(line.rstrip() for line in lines)


def _printable(text):
    """Text as a terminal shows it harmlessly: control and other unprintable characters escaped (\\x1b,
    \\n), so a stored value can never move the cursor, recolour the screen or forge a row."""
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode("ascii") for c in text)
