"""Files and batch jobs in the database (auth.schema's files, batches, batch_lines) and on disk.

A file's bytes live under `files_dir`, named by its id; its metadata is a
row. A batch is a row and one row per input line: `pending`, `running`
(handed to the engine), then `done` or `failed` with its output line. A
line is marked `running` in the same transaction that picks it, and a
worker that starts sets its batches' `running` lines back to `pending`: a
crash repeats only the lines it was computing, never a finished one.

Every read takes the caller (`user`, `admin`): a user sees only their own
files and batches (404 for anyone else's), an admin sees all.
"""

import json
import os
import secrets
import shutil
from datetime import datetime, timedelta, timezone

import sqlalchemy as sa

from auth.schema import batch_lines, batches, files
from service.errors import APIError

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
        """Copy `stream` to disk (at most `limit` bytes: APIError 413 past it) and record it."""
        file_id = f"file-{secrets.token_hex(12)}"
        path = self.path(file_id)
        size = 0
        try:
            with open(path, "wb") as out:
                while chunk := stream.read(CHUNK):
                    size += len(chunk)
                    if size > limit:
                        raise APIError(413, f"file is larger than {limit} bytes", "file_too_large", "file")
                    out.write(chunk)
        except BaseException:
            os.unlink(path)
            raise
        return self.record_file(file_id, user, purpose, filename, size)

    def record_file(self, file_id, user, purpose, filename, size):
        row = dict(id=file_id, user=user, purpose=purpose, filename=filename[:255] or "upload.jsonl", bytes=size,
                   created_at=now())
        with self.engine.begin() as conn:
            conn.execute(files.insert().values(**row))
        return _file_json(row)

    def path(self, file_id):
        return os.path.join(self.dir, file_id)

    def get_file(self, file_id, user, admin):
        with self.engine.connect() as conn:
            row = conn.execute(sa.select(files).where(files.c.id == file_id)).mappings().first()
        if row is None or not (admin or row["user"] == user):
            raise APIError(404, f"no such file: {file_id[:80]!r}", "file_not_found", "file_id")
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
            conn.execute(files.delete().where(files.c.id == file_id))
        try:
            os.unlink(self.path(file_id))
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
                raise APIError(404, f"no such batch: {batch_id[:80]!r}", "batch_not_found", "batch_id")
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
            raise APIError(409, f"batch {batch_id} is {batch['status']}; only a running batch can be cancelled",
                           "batch_not_cancellable", "batch_id")
        return self.get_batch(batch_id, user, admin)

    def set_status(self, batch_id, status, time_field=None, **values):
        if time_field:
            values[time_field] = now()
        with self.engine.begin() as conn:
            conn.execute(batches.update().where(batches.c.id == batch_id).values(status=status, **values))

    # --- the runner's side ---
    def reset_running(self):
        """Lines a worker that died was computing go back to pending; how many."""
        with self.engine.begin() as conn:
            return conn.execute(batch_lines.update().where(batch_lines.c.status == "running")
                                .values(status="pending")).rowcount

    def active(self):
        """Batches in progress or being cancelled, oldest first."""
        query = (sa.select(batches.c.id, batches.c.user, batches.c.endpoint, batches.c.status, batches.c.expires_at)
                 .where(batches.c.status.in_(("in_progress", "cancelling"))).order_by(batches.c.created_at))
        with self.engine.connect() as conn:
            return [dict(r) for r in conn.execute(query).mappings()]

    def claim(self, batch_id):
        """The next pending line of a batch, now running: (line, custom_id, prepared), or None."""
        with self.engine.begin() as conn:
            row = conn.execute(sa.select(batch_lines.c.line, batch_lines.c.custom_id, batch_lines.c.prepared)
                               .where(batch_lines.c.batch_id == batch_id, batch_lines.c.status == "pending")
                               .order_by(batch_lines.c.line).limit(1)).first()
            if row is None:
                return None
            conn.execute(batch_lines.update().where(batch_lines.c.batch_id == batch_id,
                                                    batch_lines.c.line == row.line).values(status="running"))
        return row.line, row.custom_id, json.loads(row.prepared)

    def release(self, batch_id, line):
        """A claimed line that could not start (the engine was full): pending again."""
        with self.engine.begin() as conn:
            conn.execute(batch_lines.update().where(batch_lines.c.batch_id == batch_id, batch_lines.c.line == line)
                         .values(status="pending"))

    def finish_line(self, batch_id, line, ok, result):
        with self.engine.begin() as conn:
            conn.execute(batch_lines.update().where(batch_lines.c.batch_id == batch_id, batch_lines.c.line == line)
                         .values(status="done" if ok else "failed", result=json.dumps(result)))

    def fail_pending(self, batch_id, result_of):
        """Every pending line failed with `result_of(custom_id)` (an expired batch's rest)."""
        with self.engine.begin() as conn:
            rows = conn.execute(sa.select(batch_lines.c.line, batch_lines.c.custom_id).where(
                batch_lines.c.batch_id == batch_id, batch_lines.c.status == "pending")).all()
            for row in rows:
                conn.execute(batch_lines.update().where(batch_lines.c.batch_id == batch_id,
                                                        batch_lines.c.line == row.line)
                             .values(status="failed", result=json.dumps(result_of(row.custom_id))))

    def unfinished(self, batch_id):
        """Lines still pending or running."""
        with self.engine.connect() as conn:
            return conn.execute(sa.select(sa.func.count()).select_from(batch_lines).where(
                batch_lines.c.batch_id == batch_id, batch_lines.c.status.in_(("pending", "running")))).scalar_one()

    def finalize(self, batch_id, user, status, time_field):
        """Write the output and error files from the finished lines (in input order) and end the batch."""
        self.set_status(batch_id, "finalizing", "finalizing_at")
        ids = {}
        with self.engine.connect() as conn:
            rows = list(conn.execute(sa.select(batch_lines.c.status, batch_lines.c.result).where(
                batch_lines.c.batch_id == batch_id, batch_lines.c.status.in_(("done", "failed")))
                .order_by(batch_lines.c.line)))
        for kind, wanted in (("output_file_id", "done"), ("error_file_id", "failed")):
            lines = [r.result for r in rows if r.status == wanted]
            if not lines:
                continue
            file_id = f"file-{secrets.token_hex(12)}"
            temporary = self.path(file_id) + ".part"
            with open(temporary, "w", encoding="utf-8") as out:
                for text in lines:
                    out.write(text + "\n")
            shutil.move(temporary, self.path(file_id))
            size = os.path.getsize(self.path(file_id))
            self.record_file(file_id, user, "batch_output", f"{batch_id}_{kind.split('_')[0]}.jsonl", size)
            ids[kind] = file_id
        self.set_status(batch_id, status, time_field, **ids)

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
