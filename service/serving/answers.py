"""The final answer: extracted from the answer part, and checked against an expected one.

`final_answer` is the last `\\boxed{...}` (or `\\fbox{...}`) of the answer,
its braces balanced. `Checker` compares it with a client's `expected_answer`
by Hugging Face's math-verify (`1/2`, `0.5` and `\\frac{1}{2}` are equal;
`3` answers `x=3`) in a pool of worker processes with a time limit: its own
signal-based timeout does not work in gunicorn's threads, and a hostile
expression can hang sympy, so a check past its time is stopped (its process
with it) and the answer says `correct: null` with the reason.
"""

import re
import threading
from collections import OrderedDict
from concurrent.futures import TimeoutError as FutureTimeout

from service.processes import Processes

BOXED = re.compile(r"\\(?:boxed|fbox)\s*\{")
CANDIDATES = 16  # the last boxes tried, each scanned to its closing brace: an unclosed one costs a scan
WAITING_PER_WORKER = 4  # checks that may wait for each process; past that a check is not run (null, "busy")
REMEMBERED = 4096  # verdicts kept per worker (each pair is at most two short strings)
START_S = 20  # for a checking process to start (spawned, sympy imported): waited for besides the check's time


def final_answer(text):
    """The content of the last balanced `\\boxed{...}` or `\\fbox{...}` in `text`, or None."""
    for match in reversed(list(BOXED.finditer(text or ""))[-CANDIDATES:]):
        depth = 1
        for at in range(match.end(), len(text)):
            depth += {"{": 1, "}": -1}.get(text[at], 0)
            if depth == 0:
                return text[match.end():at].strip()
    return None


def _load():
    """A checking process's start: math-verify imported before any check's time runs."""
    import logging

    logging.getLogger("math_verify").setLevel(logging.ERROR)  # it warns that its own timeout is off: it is
    verify("1", "1")  # the parser and sympy warmed up here, not inside the first check's time


def verify(expected, given):
    """True or False when math-verify can tell whether `given` equals `expected`, None when it cannot read
    either. Runs in a checking process: no time limit of its own (the pool's stops it)."""
    from math_verify import parse
    from math_verify import verify as equal

    gold, answer = (parse(f"${text}$", parsing_timeout=None) for text in (expected, given))
    if not gold or not answer:
        return None
    return bool(equal(gold, answer, timeout_seconds=None))


class Checker:
    """The pool of checking processes of one worker, started on first use."""

    def __init__(self, timeout_s, workers=1):
        self.timeout_s, self._processes = timeout_s, Processes(workers, initializer=_load)
        self._waiting = threading.BoundedSemaphore(workers * (1 + WAITING_PER_WORKER))
        self._known, self._lock = OrderedDict(), threading.Lock()  # (expected, given) -> verdict, newest last

    def check(self, expected, given):
        """(correct, reason): True or False, or None with the reason it could not be decided. A pair checked
        before answers from memory, a timeout included: a hostile expression asked again costs nothing."""
        if given is None:
            return None, "the answer has no \\boxed{} final answer to check"
        with self._lock:
            if (expected, given) in self._known:
                self._known.move_to_end((expected, given))
                return self._known[(expected, given)]
        verdict, final = self._check(expected, given)
        if final:
            with self._lock:
                self._known[(expected, given)] = verdict
                while len(self._known) > REMEMBERED:
                    self._known.popitem(last=False)
        return verdict

    def _check(self, expected, given):
        """(verdict, final): final unless the pool was too busy to ask (then the same pair may be asked again)."""
        if not self._waiting.acquire(blocking=False):
            return (None, "too many answers are being checked now"), False
        try:
            future = self._processes.pool().schedule(verify, args=(expected, given), timeout=self.timeout_s)
            correct = future.result(timeout=self.timeout_s + START_S)  # the pool stops the check at timeout_s
        except FutureTimeout:
            future.cancel()  # not started: dropped; running: its process is stopped
            return (None, f"the check did not finish within {self.timeout_s:g} s"), True
        except Exception as exc:  # noqa: BLE001 - the process died (memory, a crash in sympy): no verdict
            return (None, f"the check failed ({type(exc).__name__})"), True
        finally:
            self._waiting.release()
        return (correct, None if correct is not None else "math-verify could not read the expected or final "
                "answer"), True

    def close(self):
        """Stop the checking processes."""
        self._processes.close()
