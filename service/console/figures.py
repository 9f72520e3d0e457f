"""The usage page's figures from the store's daily rows (auth.store.usage_by_day): series per day, the top
users, and the CSV export. Plain functions over lists: no HTTP, no database."""

import csv
import io
from datetime import timedelta

CSV_COLUMNS = ("day", "user", "requests", "succeeded", "cached", "prompt_tokens", "completion_tokens",
               "total_tokens", "forced_tokens", "cached_tokens")


def days(today, count):
    """The `count` UTC days ending with `today`, oldest first, as YYYY-MM-DD."""
    return [(today - timedelta(days=count - 1 - i)).isoformat() for i in range(count)]


def per_day(rows, field, span):
    """[(MM-DD, sum of `field` over the users that day)] for each day of `span` (no row: 0)."""
    totals = dict.fromkeys(span, 0)
    for row in rows:
        if row["day"] in totals:
            totals[row["day"]] += row[field]
    return [(day[5:], total) for day, total in totals.items()]


def top_users(rows, field, count=10):
    """[(user, sum of `field`)] for the `count` users with the most, most first."""
    totals = {}
    for row in rows:
        totals[row["user"]] = totals.get(row["user"], 0) + row[field]
    return sorted(totals.items(), key=lambda item: (-item[1], item[0]))[:count]


def usage_csv(rows):
    """The rows as CSV text; a cell that a spreadsheet would run as a formula is quoted with a leading '."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\r\n")
    writer.writerow(CSV_COLUMNS)
    for row in rows:
        writer.writerow([_cell(row[column]) for column in CSV_COLUMNS])
    return out.getvalue()


def _cell(value):
    text = str(value)
    return "'" + text if text[:1] in ("=", "+", "-", "@", "\t", "\r") and not _number(text) else text


def _number(text):
    try:
        float(text)
    except ValueError:
        return False
    return True
