"""Transcripts: the generations of users who opted in, kept for model iteration, readable by admins only.

Who is kept is decided in one place, `transcripts_on`. A transcript (the messages, documents' text, each
choice's reasoning and answer, the parameters, phases, status and error) is stored as one row: what an
admin filters by in the clear (user, time, model, route, status, request id) and the rest as AES-256-GCM
ciphertext under a key of the key folder (auth.keys.transcript_key), its kid on the row. The row's id is
the ciphertext's associated data, so a ciphertext moved to another row does not open; a wrong or altered
key fails loudly (TranscriptUnreadable), never with garbage. A database file or a backup holds no text.

Every read of a transcript's content is audited (`transcript.read`, `transcript.export`); rows past the
retention are deleted by `purge` (the service's transcript writer runs it hourly, and
`vibethinker-admin transcripts purge`).
"""

import json
import os
import uuid
import zlib

import sqlalchemy as sa
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from auth import keys
from auth.errors import StoreError
from auth.schema import transcripts, users
from auth.store import aware

NONCE_BYTES = 12
COLUMNS = ("id", "user", "team", "created_at", "model", "route", "status", "request_id", "kid")


def transcripts_on(row):
    """Whether the generations of a request are kept: its token record's (auth.store.get_token) or its user
    row's `transcripts` flag, or their team's. The one place this is decided."""
    return bool(row.get("transcripts") or row.get("team_transcripts"))


class TranscriptUnreadable(StoreError):
    """A transcript that does not decrypt: another key under its kid, or altered bytes."""

    def __init__(self, transcript_id):
        super().__init__(500, f"transcript {transcript_id} cannot be decrypted with the key folder's key: the "
                         "key is not the one it was written with, or the row was altered", "transcript_unreadable")


class Transcripts:
    """Transcript rows over the store's database (and its clock), sealed with the key folder's key."""

    def __init__(self, store, key_dir):
        self.store, self.engine, self.key_dir = store, store.engine, key_dir
        self._keys = {}  # kid -> AESGCM

    def _cipher(self, kid):
        if kid not in self._keys:
            self._keys[kid] = AESGCM(keys.read_transcript_key(self.key_dir, kid))
        return self._keys[kid]

    def write(self, items):
        """Store transcripts [{user, team, created_at, model, route, status, request_id, content}] in one transaction;
        those of users removed meanwhile are dropped. How many were stored."""
        kid = keys.transcript_key(self.key_dir)  # made on first need
        cipher = self._cipher(kid)
        names = {item["user"] for item in items}
        with self.engine.begin() as conn:
            ids = dict(conn.execute(sa.select(users.c.name, users.c.id).where(users.c.name.in_(names))).all())
            rows = []
            for item in items:
                if item["user"] not in ids:
                    continue
                row_id = uuid.uuid4().hex
                rows.append({"id": row_id, "user_id": ids[item["user"]], "team": item.get("team"),
                             "created_at": item["created_at"],
                             "model": item.get("model"), "route": item["route"], "status": item["status"],
                             "request_id": item["request_id"], "kid": kid,
                             "ciphertext": seal(cipher, row_id, item["content"])})
            if rows:
                conn.execute(transcripts.insert(), rows)
        return len(rows)

    def list(self, user=None, since=None, until=None, limit=100, team=None):
        """Metadata of transcripts, newest first (no content: nothing to audit)."""
        query = self._select().order_by(transcripts.c.created_at.desc(), transcripts.c.id).limit(limit)
        return [_meta(row) for row in self._rows(query, user, since, until, team)]

    def read(self, transcript_id, actor="system", source="cli"):
        """One transcript, decrypted, with its metadata; audited as `transcript.read`. StoreError 404 when
        unknown, TranscriptUnreadable when it does not decrypt."""
        with self.engine.connect() as conn:
            row = conn.execute(self._select().where(transcripts.c.id == transcript_id)).mappings().first()
        if row is None:
            raise StoreError(404, f"no such transcript: {transcript_id[:64]!r}", "transcript_not_found", "id")
        found = {**_meta(row), **self._open(row)}
        self.store.record_event("transcript.read", transcript_id, {"user": row["user"]}, actor=actor, source=source)
        return found

    def export(self, since, user=None, actor="system", source="cli", team=None):
        """Every transcript since `since` (of `user`, of requests that counted against `team`), oldest first,
        decrypted; audited as `transcript.export` with the count (all are decrypted before any is returned: one
        unreadable fails the export)."""
        query = self._select().order_by(transcripts.c.created_at, transcripts.c.id)
        found = [{**_meta(row), **self._open(row)} for row in self._rows(query, user, since, None, team)]
        target = user or (f"team:{team}" if team else "*")
        self.store.record_event("transcript.export", target, {"count": len(found), "since": since.isoformat()},
                                actor=actor, source=source)
        return found

    def purge(self, retention):
        """Delete transcripts older than `retention` (a timedelta) by the store's clock; how many."""
        with self.engine.begin() as conn:
            return conn.execute(transcripts.delete()
                                .where(transcripts.c.created_at < self.store.clock() - retention)).rowcount

    def _select(self):
        return sa.select(*(transcripts.c[name] for name in COLUMNS if name != "user"),
                         users.c.name.label("user"), transcripts.c.ciphertext).join(users)

    def _rows(self, query, user, since, until, team=None):
        if user is not None:
            query = query.where(users.c.name == user)
        if team is not None:
            query = query.where(transcripts.c.team == team)
        if since is not None:
            query = query.where(transcripts.c.created_at >= aware(since))
        if until is not None:
            query = query.where(transcripts.c.created_at < aware(until))
        with self.engine.connect() as conn:
            return list(conn.execute(query).mappings())

    def _open(self, row):
        try:
            return unseal(self._cipher(row["kid"]), row["id"], row["ciphertext"])
        except InvalidTag:
            raise TranscriptUnreadable(row["id"]) from None
        except keys.KeyFolderError as exc:
            raise StoreError(500, str(exc), "transcript_key_missing") from None


def seal(cipher, row_id, content):
    """The ciphertext of `content` (JSON, compressed) for row `row_id`: a random nonce, then AES-GCM's output."""
    nonce = os.urandom(NONCE_BYTES)
    plain = zlib.compress(json.dumps(content, ensure_ascii=False, separators=(",", ":")).encode())
    return nonce + cipher.encrypt(nonce, plain, _bound(row_id))


def unseal(cipher, row_id, blob):
    """The content sealed for row `row_id`; InvalidTag when the key or the bytes are not the ones sealed."""
    plain = cipher.decrypt(bytes(blob[:NONCE_BYTES]), bytes(blob[NONCE_BYTES:]), _bound(row_id))
    return json.loads(zlib.decompress(plain))


def _bound(row_id):
    """The associated data: a ciphertext opens only as the row it was written for."""
    return f"vibethinker transcript {row_id}".encode()


def _meta(row):
    return {**{name: row[name] for name in COLUMNS}, "created_at": aware(row["created_at"]).isoformat()}
