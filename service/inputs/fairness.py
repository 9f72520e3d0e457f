"""Fair turns at a worker's reading processes: no user holds more than their share, a user's second document
waits behind other users' first ones, and a full pool queues briefly before it refuses.

A document's turn is a `Gate.turn(user, wait_s)`: granted at once when a
process is free and it is the user's turn, otherwise queued up to `wait_s`,
then Busy. Turns are handed out

- within shares: a user holds at most ceil(processes / max(2, users
  reading or waiting)) processes, so one user never fills a pool of two or
  more, and the share shrinks as more users wait;
- round-robin between users: among the waiting documents, the one whose
  user has had the fewest turns (plus their own documents waiting ahead of
  it) goes first, arrival breaking ties; so with one process a user's second
  document waits behind another user's first, not the other way round. A
  user who comes in starts level with the one who has finished fewest turns,
  so a newcomer is not owed every turn the others had; the counts start
  over whenever the gate is idle.

Per worker and in memory: the users are those of this worker's requests.
"""

import itertools
import math
import threading
import time
from collections import Counter


class Busy(Exception):
    """No turn came within the wait (or too many documents already wait)."""


class Gate:
    """Turns at `processes` reading processes, with at most `waiting` documents queued."""

    def __init__(self, processes, waiting):
        self.processes, self.waiting = processes, waiting
        self._cond = threading.Condition()
        self._running = Counter()  # user -> documents being read
        self._served = Counter()  # user -> turns had since the gate was last idle
        self._queue = []  # (arrival, user), in arrival order
        self._arrivals = itertools.count()

    def share(self):
        """The most processes one user may hold now (call with the lock held)."""
        users = {user for user, count in self._running.items() if count} | {user for _, user in self._queue}
        return max(1, math.ceil(self.processes / max(2, len(users))))

    def _next(self):
        """The waiting ticket whose turn it is, or None while no process is free for anyone waiting."""
        if sum(self._running.values()) >= self.processes:
            return None
        share, ahead, best = self.share(), Counter(), None
        for ticket in self._queue:
            arrival, user = ticket
            rank = (self._served[user] + ahead[user], arrival)
            ahead[user] += 1
            if self._running[user] < share and (best is None or rank < best[0]):
                best = (rank, ticket)
        return None if best is None else best[1]

    def _arrive(self, user):
        """A user not reading or waiting now starts level with the user who has finished fewest turns."""
        active = {u for u, count in self._running.items() if count} | {u for _, u in self._queue}
        if user not in active:
            self._served[user] = min((self._served[u] - self._running[u] for u in active), default=0)

    def turn(self, user, wait_s):
        """Wait for `user`'s turn, at most `wait_s` seconds; Busy when none came (or the queue is full)."""
        deadline = time.monotonic() + wait_s
        with self._cond:
            if len(self._queue) >= self.waiting:
                raise Busy()
            ticket = (next(self._arrivals), user)
            self._arrive(user)
            self._queue.append(ticket)
            while self._next() != ticket:
                left = deadline - time.monotonic()
                if left <= 0:
                    self._queue.remove(ticket)
                    self._cond.notify_all()  # another's turn may have waited behind this one
                    raise Busy()
                self._cond.wait(left)
            self._queue.remove(ticket)
            self._running[user] += 1
            self._served[user] += 1
            self._cond.notify_all()  # a second free process may be another waiter's now

    def done(self, user):
        """`user`'s document has left its process: the next turn is someone's."""
        with self._cond:
            self._running[user] -= 1
            if not self._running[user]:
                del self._running[user]
            if not self._running and not self._queue:
                self._served.clear()
            self._cond.notify_all()

    def holding(self):
        """{user: documents being read}, for tests and the log."""
        with self._cond:
            return dict(self._running)
