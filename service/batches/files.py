"""Uploaded files and a batch's output files, in the database (service.batches.tables' files, file_chunks).

A file's bytes live in the database in pieces of 1 MiB (an upload is first
spooled under `files_dir`, so no transaction waits on a client), so every
server of a cluster reads every file and a database backup holds them;
files from before that are read from `files_dir`.

Every read takes the caller (`user`, `admin`): a user sees only their own
files (404 for anyone else's), an admin (by the token's scope) sees all.
A file expires (`expires_at`, OpenAI's `expires_after`, or the server's
default): from then on it is not found, and `purge_expired` deletes it.
"""

import io
import os
import secrets
import tempfile
import unicodedata
from datetime import datetime, timedelta, timezone

import sqlalchemy as sa

from service.batches.tables import file_chunks, files
from service.batches import quotas
from service.errors import BadRequest, NotFound, TooLarge

CHUNK = 1 << 20
EXPIRES_AFTER = (3600, 30 * 86400)  # the seconds OpenAI's expires_after allows
PURGE_GROUP = 100  # files deleted in one transaction


def now():
    return datetime.now(timezone.utc)


def timestamp(value):
    """A stored time as Unix seconds (SQLite's naive times are UTC); None stays None."""
    if value is None:
        return None
    value = value if value.tzinfo else value.replace(tzinfo=timezone.utc)
    return int(value.timestamp())


class FileRecords:
    """Files over the store's database engine and a folder."""

    def __init__(self, engine, files_dir, expiry_s=30 * 86400):
        self.engine, self.dir, self.expiry_s = engine, os.path.abspath(files_dir), expiry_s  # outputs' expiry
        os.makedirs(self.dir, mode=0o700, exist_ok=True)

    def add_file(self, user, purpose, filename, stream, limit, expires_s=None, quota=None):
        """Copy `stream` (at most `limit` bytes: TooLarge past it) into the database and record it, to expire
        after `expires_s`; LimitReached when the user's storage `quota` (quotas.StorageQuota) cannot hold it."""
        if quota is not None:  # early: a full quota costs no spooling (checked again as the file is stored)
            with self.engine.connect() as conn:
                quotas.check_files(conn, user, quota, 0)
        with tempfile.TemporaryFile(dir=self.dir) as spool:
            size = 0
            while chunk := stream.read(CHUNK):
                size += len(chunk)
                if size > limit:
                    raise TooLarge(f"file is larger than {limit} bytes", "file_too_large", "file")
                spool.write(chunk)
            spool.seek(0)
            return self._store(f"file-{secrets.token_hex(12)}", user, purpose, filename, iter(
                lambda: spool.read(CHUNK), b""), size, expires_s, quota)

    def _store(self, file_id, user, purpose, filename, chunks, size, expires_s=None, quota=None):
        """Record a file of `size` bytes whose pieces `chunks` yields, to expire after `expires_s` (None: the
        outputs' expiry), in one transaction: with the user's `quota`, only if it holds the file."""
        created = now()
        row = dict(id=file_id, user=user, purpose=purpose, filename=filename[:255] or "upload.jsonl", bytes=size,
                   created_at=created, expires_at=created + timedelta(seconds=expires_s or self.expiry_s))
        with self.engine.begin() as conn:
            if quota is not None:
                quotas.hold(conn, user)
                quotas.check_files(conn, user, quota, size)
            for seq, piece in enumerate(chunks):
                conn.execute(file_chunks.insert().values(file_id=file_id, seq=seq, data=piece))
            if not size:  # an empty file still has its first piece: it is in the database
                conn.execute(file_chunks.insert().values(file_id=file_id, seq=0, data=b""))
            conn.execute(files.insert().values(**row))
        return _file_json(row)

    def open(self, file_id):
        """The bytes of file `file_id` (looked up already) as a binary file object, read a piece at a time."""
        first = _piece(self.engine, file_id, 0)
        if first is None:  # written before files moved into the database
            return open(os.path.join(self.dir, file_id), "rb")
        return io.BufferedReader(_Chunks(self.engine, file_id, first), CHUNK)

    def get_file(self, file_id, user, admin):
        with self.engine.connect() as conn:
            row = conn.execute(sa.select(files).where(files.c.id == file_id, kept(now()))).mappings().first()
        if row is None or not (admin or row["user"] == user):
            raise NotFound(f"no such file: {file_id[:80]!r}", "file_not_found", "file_id")
        return _file_json(row)

    def list_files(self, user, admin, purpose=None):
        query = sa.select(files).where(kept(now())).order_by(files.c.created_at.desc())
        if not admin:
            query = query.where(files.c.user == user)
        if purpose is not None:
            query = query.where(files.c.purpose == purpose)
        with self.engine.connect() as conn:
            return [_file_json(r) for r in conn.execute(query).mappings()]

    def delete_file(self, file_id, user, admin):
        self.get_file(file_id, user, admin)
        self._delete([file_id])
        return {"id": file_id, "object": "file", "deleted": True}

    def purge_expired(self, at=None):
        """Delete every file expired by `at` (now), its bytes included; how many."""
        with self.engine.connect() as conn:
            ids = list(conn.execute(sa.select(files.c.id).where(~kept(at or now()))).scalars())
        self._delete(ids)
        return len(ids)

    def _delete(self, ids):
        for start in range(0, len(ids), PURGE_GROUP):  # short transactions: usage rows and lines go on between
            group = ids[start:start + PURGE_GROUP]
            with self.engine.begin() as conn:
                conn.execute(file_chunks.delete().where(file_chunks.c.file_id.in_(group)))
                conn.execute(files.delete().where(files.c.id.in_(group)))
        for file_id in ids:
            try:
                os.unlink(os.path.join(self.dir, file_id))
            except FileNotFoundError:
                pass


def kept(at):
    """The files not expired at `at` (NULL: from before files expired, kept)."""
    return sa.or_(files.c.expires_at.is_(None), files.c.expires_at > at)


def expiry_s(anchor, seconds, default_s):
    """Seconds until an upload expires, from OpenAI's expires_after[anchor] and [seconds] (both or neither)."""
    if anchor is None and seconds is None:
        return default_s
    if anchor != "created_at":
        raise BadRequest("expires_after[anchor] must be created_at", "invalid_value", "expires_after.anchor")
    low, high = EXPIRES_AFTER
    try:
        value = int(seconds)
    except (TypeError, ValueError):
        value = None
    if value is None or not low <= value <= high:
        raise BadRequest(f"expires_after[seconds] must be an integer between {low} and {high}", "out_of_range",
                         "expires_after.seconds")
    return value


def clean_filename(name):
    """An uploaded file's name as stored: NFC, its last path part, at most 255 characters; BadRequest naming
    the field when it holds a control character (it would forge a header line or a log line) or a format
    character."""
    name = unicodedata.normalize("NFC", name or "")
    bad = next((c for c in name if unicodedata.category(c) in ("Cc", "Cf")), None)
    if bad is not None:  # Cf: bidirectional overrides and invisible characters would disguise a name in listings
        raise BadRequest(f"the file's filename contains the control or format character U+{ord(bad):04X}",
                         "control_character", "file")
    return name.replace("\\", "/").rsplit("/", 1)[-1].strip()[:255] or "upload.jsonl"


def _file_json(row):
    return {"id": row["id"], "object": "file", "bytes": row["bytes"],
            "created_at": timestamp(row["created_at"]), "expires_at": timestamp(row.get("expires_at")),
            "filename": row["filename"], "purpose": row["purpose"],
            "status": "processed", "status_details": None}


def _piece(engine, file_id, seq):
    """Piece `seq` of a stored file, or None past its last one (or for a file not in the database)."""
    with engine.connect() as conn:
        data = conn.execute(sa.select(file_chunks.c.data).where(file_chunks.c.file_id == file_id,
                                                                file_chunks.c.seq == seq)).scalar()
    return None if data is None else bytes(data)


class _Chunks(io.RawIOBase):
    """A stored file's pieces as a raw stream, from its `first` piece (already read): one query per piece,
    so memory stays at one piece."""

    def __init__(self, engine, file_id, first):
        self.engine, self.file_id, self.seq, self.piece = engine, file_id, 1, memoryview(first)

    def readable(self):
        return True

    def readinto(self, buffer):
        while not self.piece:
            data = _piece(self.engine, self.file_id, self.seq)
            if data is None:
                return 0
            self.piece, self.seq = memoryview(data), self.seq + 1
        count = min(len(buffer), len(self.piece))
        buffer[:count] = self.piece[:count]
        self.piece = self.piece[count:]
        return count
