"""Files and batch jobs in the database (auth.schema's files, file_chunks, batches, batch_lines).

A file's bytes live in the database in pieces of 1 MiB (an upload is first
spooled under `files_dir`, so no transaction waits on a client), so every
server of a cluster reads every file and a database backup holds them;
files from before that are read from `files_dir`. A batch is a row and one
row per input line: `pending`, `running` (handed to an engine by one batch
runner, its `owner`), then `done` or `failed` with its output line. A line
is marked `running` only if it is still pending, in one statement, so two
runners never take the same line; only its owner may finish it. A runner
that starts sets the running lines of dead runners on its host back to
pending, and any runner does the same for an owner that stopped beating
(service.batches.runner): a crash repeats only the lines it was computing,
never a finished one.

Every read takes the caller (`user`, `admin`): a user sees only their own
files and batches (404 for anyone else's), an admin sees all.
"""

import io
import json
import os
import secrets
import tempfile
from datetime import datetime, timedelta, timezone

import sqlalchemy as sa

from auth.schema import batch_lines, batches, file_chunks, files
from service.errors import Conflict, NotFound, TooLarge

OPEN = ("validating", "in_progress", "finalizing", "cancelling")
TIMES = ("in_progress_at", "finalizing_at", "completed_at", "failed_at", "expired_at", "cancelling_at",
         "cancelled_at")
CHUNK = 1 << 20


def now():
    return datetime.now(timezone.utc)


def _ts(value):
    if value is None:
        return None
    value = value if value.tzinfo else value.replace(tzinfo=timezone.utc)
    return int(value.timestamp())


class BatchRecords:
    """Files and batches over the store's database engine and a folder."""

    def __init__(self, engine, files_dir):
        self.engine, self.dir = engine, os.path.abspath(files_dir)
        os.makedirs(self.dir, mode=0o700, exist_ok=True)

    # --- files ---
    def add_file(self, user, purpose, filename, stream, limit):
        """Copy `stream` (at most `limit` bytes: TooLarge past it) into the database and record it."""
        with tempfile.TemporaryFile(dir=self.dir) as spool:
            size = 0
            while chunk := stream.read(CHUNK):
                size += len(chunk)
                if size > limit:
                    raise TooLarge(f"file is larger than {limit} bytes", "file_too_large", "file")
                spool.write(chunk)
            spool.seek(0)
            return self._store(f"file-{secrets.token_hex(12)}", user, purpose, filename, iter(
                lambda: spool.read(CHUNK), b""), size)

    def _store(self, file_id, user, purpose, filename, chunks, size):
        """Record a file of `size` bytes whose pieces `chunks` yields, in one transaction."""
        row = dict(id=file_id, user=user, purpose=purpose, filename=filename[:255] or "upload.jsonl", bytes=size,
                   created_at=now())
        with self.engine.begin() as conn:
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
            row = conn.execute(sa.select(files).where(files.c.id == file_id)).mappings().first()
        if row is None or not (admin or row["user"] == user):
            raise NotFound(f"no such file: {file_id[:80]!r}", "file_not_found", "file_id")
        return _file_json(row)

    def list_files(self, user, admin, purpose=None):
        query = sa.select(files).order_by(files.c.created_at.desc())
        if not admin:
            query = query.where(files.c.user == user)
        if purpose is not None:
            query = query.where(files.c.purpose == purpose)
        with self.engine.connect() as conn:
            return [_file_json(r) for r in conn.execute(query).mappings()]

    def delete_file(self, file_id, user, admin):
        self.get_file(file_id, user, admin)
        with self.engine.begin() as conn:
            conn.execute(file_chunks.delete().where(file_chunks.c.file_id == file_id))
            conn.execute(files.delete().where(files.c.id == file_id))
        try:
            os.unlink(os.path.join(self.dir, file_id))
        except FileNotFoundError:
            pass
        return {"id": file_id, "object": "file", "deleted": True}

    # --- batches ---
    def open_count(self, user):
        with self.engine.connect() as conn:
            return conn.execute(sa.select(sa.func.count()).select_from(batches)
                                .where(batches.c.user == user, batches.c.status.in_(OPEN))).scalar_one()

    def create_batch(self, user, endpoint, input_file_id, window, window_s, metadata, lines, errors):
        """A batch of `lines` [(custom_id, prepared)], in progress, or failed with `errors` when there are any."""
        batch_id, created = f"batch_{secrets.token_hex(12)}", now()
        failed = bool(errors)
        row = dict(id=batch_id, user=user, endpoint=endpoint, input_file_id=input_file_id, completion_window=window,
                   status="failed" if failed else "in_progress", total=0 if failed else len(lines),
                   created_at=created, expires_at=created + timedelta(seconds=window_s),
                   metadata=json.dumps(metadata) if metadata is not None else None,
                   errors=json.dumps({"object": "list", "data": errors}) if failed else None,
                   **({"failed_at": created} if failed else {"in_progress_at": created}))
        with self.engine.begin() as conn:
            conn.execute(batches.insert().values(**row))
            if not failed:
                conn.execute(batch_lines.insert(), [
                    {"batch_id": batch_id, "line": i, "custom_id": custom_id, "prepared": json.dumps(prepared),
                     "status": "pending"} for i, (custom_id, prepared) in enumerate(lines)])
        return self.get_batch(batch_id, user, True)

    def get_batch(self, batch_id, user, admin):
        with self.engine.connect() as conn:
            row = conn.execute(sa.select(batches).where(batches.c.id == batch_id)).mappings().first()
            if row is None or not (admin or row["user"] == user):
                raise NotFound(f"no such batch: {batch_id[:80]!r}", "batch_not_found", "batch_id")
            return _batch_json(row, self._counts(conn, batch_id))

    def list_batches(self, user, admin, limit=20, after=None):
        query = sa.select(batches).order_by(batches.c.created_at.desc(), batches.c.id.desc())
        if not admin:
            query = query.where(batches.c.user == user)
        with self.engine.connect() as conn:
            if after is not None:
                anchor = conn.execute(sa.select(batches.c.created_at).where(batches.c.id == after)).scalar()
                if anchor is not None:
                    query = query.where(batches.c.created_at < anchor)
            rows = list(conn.execute(query.limit(limit + 1)).mappings())
            data = [_batch_json(r, self._counts(conn, r["id"])) for r in rows[:limit]]
        return {"object": "list", "data": data, "first_id": data[0]["id"] if data else None,
                "last_id": data[-1]["id"] if data else None, "has_more": len(rows) > limit}

    def cancel(self, batch_id, user, admin):
        batch = self.get_batch(batch_id, user, admin)
        if batch["status"] in ("validating", "in_progress"):
            self.set_status(batch_id, "cancelling", "cancelling_at")
        elif batch["status"] not in ("cancelling", "cancelled"):
            raise Conflict(f"batch {batch_id} is {batch['status']}; only a running batch can be cancelled",
                           "batch_not_cancellable", "batch_id")
        return self.get_batch(batch_id, user, admin)

    def set_status(self, batch_id, status, time_field=None, **values):
        if time_field:
            values[time_field] = now()
        with self.engine.begin() as conn:
            conn.execute(batches.update().where(batches.c.id == batch_id).values(status=status, **values))

    # --- the runner's side ---
    def running_owners(self):
        """The runners holding running lines (None: lines taken before runners were named)."""
        with self.engine.connect() as conn:
            return set(conn.execute(sa.select(batch_lines.c.owner).distinct()
                                    .where(batch_lines.c.status == "running")).scalars())

    def reclaim(self, owner):
        """The running lines of `owner` (a runner that stopped) go back to pending; how many."""
        held = batch_lines.c.owner.is_(None) if owner is None else batch_lines.c.owner == owner
        with self.engine.begin() as conn:
            return conn.execute(batch_lines.update().where(batch_lines.c.status == "running", held)
                                .values(status="pending", owner=None, claimed_at=None)).rowcount

    def beat(self, owner):
        """Renew the running lines `owner` holds: they are its for another lease."""
        with self.engine.begin() as conn:
            conn.execute(batch_lines.update().where(batch_lines.c.status == "running", batch_lines.c.owner == owner)
                         .values(claimed_at=now()))

    def reclaim_stale(self, before, owner):
        """Running lines of other runners not renewed since `before` (their runner stopped) go back to pending;
        how many."""
        with self.engine.begin() as conn:
            return conn.execute(batch_lines.update().where(
                batch_lines.c.status == "running", batch_lines.c.owner != owner, batch_lines.c.claimed_at < before)
                .values(status="pending", owner=None, claimed_at=None)).rowcount

    def active(self):
        """Batches in progress or being cancelled, oldest first."""
        query = (sa.select(batches.c.id, batches.c.user, batches.c.endpoint, batches.c.status, batches.c.expires_at)
                 .where(batches.c.status.in_(("in_progress", "cancelling"))).order_by(batches.c.created_at))
        with self.engine.connect() as conn:
            return [dict(r) for r in conn.execute(query).mappings()]

    def claim(self, batch_id, owner):
        """The next pending line of a batch, now running for `owner`: (line, custom_id, prepared), or None.

        A line another runner took between the look and the update is skipped, never taken twice."""
        while True:
            with self.engine.begin() as conn:
                row = conn.execute(sa.select(batch_lines.c.line, batch_lines.c.custom_id, batch_lines.c.prepared)
                                   .where(batch_lines.c.batch_id == batch_id, batch_lines.c.status == "pending")
                                   .order_by(batch_lines.c.line).limit(1)).first()
                if row is None:
                    return None
                taken = conn.execute(batch_lines.update().where(
                    batch_lines.c.batch_id == batch_id, batch_lines.c.line == row.line,
                    batch_lines.c.status == "pending").values(status="running", owner=owner,
                                                              claimed_at=now())).rowcount
            if taken:
                return row.line, row.custom_id, json.loads(row.prepared)

    def release(self, batch_id, line, owner):
        """A claimed line that could not start (the engine was full): pending again."""
        with self.engine.begin() as conn:
            conn.execute(batch_lines.update().where(batch_lines.c.batch_id == batch_id, batch_lines.c.line == line,
                                                    batch_lines.c.owner == owner, batch_lines.c.status == "running")
                         .values(status="pending", owner=None, claimed_at=None))

    def finish_line(self, batch_id, line, ok, result, owner):
        """Store a line's answer; False if `owner` no longer holds it (it was given to another runner)."""
        with self.engine.begin() as conn:
            return bool(conn.execute(batch_lines.update().where(
                batch_lines.c.batch_id == batch_id, batch_lines.c.line == line, batch_lines.c.owner == owner,
                batch_lines.c.status == "running").values(status="done" if ok else "failed",
                                                          result=json.dumps(result)))
                .rowcount)

    def fail_pending(self, batch_id, result_of):
        """Every pending line failed with `result_of(custom_id)` (an expired batch's rest)."""
        with self.engine.begin() as conn:
            rows = conn.execute(sa.select(batch_lines.c.line, batch_lines.c.custom_id).where(
                batch_lines.c.batch_id == batch_id, batch_lines.c.status == "pending")).all()
            for row in rows:
                conn.execute(batch_lines.update().where(batch_lines.c.batch_id == batch_id,
                                                        batch_lines.c.line == row.line,
                                                        batch_lines.c.status == "pending")
                             .values(status="failed", result=json.dumps(result_of(row.custom_id))))

    def unfinished(self, batch_id, statuses=("pending", "running")):
        """Lines in `statuses` (still pending or running), on any runner."""
        with self.engine.connect() as conn:
            return conn.execute(sa.select(sa.func.count()).select_from(batch_lines).where(
                batch_lines.c.batch_id == batch_id, batch_lines.c.status.in_(statuses))).scalar_one()

    def finalize(self, batch_id, user, status, time_field):
        """Write the output and error files from the finished lines (in input order) and end the batch.

        Only the runner that moves the batch to `finalizing` writes them; False for any other."""
        with self.engine.begin() as conn:
            won = conn.execute(batches.update().where(
                batches.c.id == batch_id, batches.c.status.in_(("in_progress", "cancelling")))
                .values(status="finalizing", finalizing_at=now())).rowcount
        if not won:
            return False
        ids = {}
        with self.engine.connect() as conn:
            rows = list(conn.execute(sa.select(batch_lines.c.status, batch_lines.c.result).where(
                batch_lines.c.batch_id == batch_id, batch_lines.c.status.in_(("done", "failed")))
                .order_by(batch_lines.c.line)))
        for kind, wanted in (("output_file_id", "done"), ("error_file_id", "failed")):
            data = "".join(r.result + "\n" for r in rows if r.status == wanted).encode()
            if not data:
                continue
            file_id = f"file-{secrets.token_hex(12)}"
            self._store(file_id, user, "batch_output", f"{batch_id}_{kind.split('_')[0]}.jsonl",
                        (data[i:i + CHUNK] for i in range(0, len(data), CHUNK)), len(data))
            ids[kind] = file_id
        self.set_status(batch_id, status, time_field, **ids)
        return True

    def _counts(self, conn, batch_id):
        rows = conn.execute(sa.select(batch_lines.c.status, sa.func.count()).where(
            batch_lines.c.batch_id == batch_id).group_by(batch_lines.c.status)).all()
        by = dict(rows)
        return {"total": sum(by.values()), "completed": by.get("done", 0), "failed": by.get("failed", 0)}


def _file_json(row):
    return {"id": row["id"], "object": "file", "bytes": row["bytes"], "created_at": _ts(row["created_at"]),
            "filename": row["filename"], "purpose": row["purpose"], "status": "processed", "status_details": None}


def _batch_json(row, counts):
    body = {"id": row["id"], "object": "batch", "endpoint": row["endpoint"],
            "errors": json.loads(row["errors"]) if row["errors"] else None,
            "input_file_id": row["input_file_id"], "completion_window": row["completion_window"],
            "status": row["status"], "output_file_id": row["output_file_id"], "error_file_id": row["error_file_id"],
            "created_at": _ts(row["created_at"]), "expires_at": _ts(row["expires_at"]),
            **{name: _ts(row[name]) for name in TIMES}, "request_counts": counts,
            "metadata": json.loads(row["metadata"]) if row["metadata"] else None}
    return body


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
