"""A generation's phases (service.records.timing), in process: laps, the engine's share, the header's syntax,
who sees them."""

import pytest

from service.inference.generation import GenerationResult
from service.records.timing import PHASES, Timings, shown


def result(queue, prefill, run):
    return GenerationResult("x", [1], 3, "stop", queue_seconds=queue, run_seconds=run, prefill_seconds=prefill)


def test_laps_give_each_phase_the_time_since_the_last_mark():
    timings = Timings(started=10.0)
    timings.lap("auth", now=10.002)
    timings.lap("limits", now=10.003)
    timings.lap("template", now=10.010)
    timings.lap("template", now=10.011)  # a phase in two parts (documents between them)
    assert timings.seconds["auth"] == pytest.approx(0.002)
    assert timings.seconds["limits"] == pytest.approx(0.001)
    assert timings.seconds["template"] == pytest.approx(0.008)
    timings.skip(now=10.5)  # not anybody's
    timings.lap("record", now=10.501)
    assert timings.seconds["record"] == pytest.approx(0.001)
    assert timings.total(now=10.6) == pytest.approx(0.6)


def test_the_engines_phases_come_from_its_result_once_and_not_for_a_replay():
    timings = Timings(started=0.0)
    timings.engine(result(queue=0.25, prefill=0.5, run=2.0))
    assert (timings.seconds["queue"], timings.seconds["prefill"], timings.seconds["decode"]) == (0.25, 0.5, 1.5)
    timings.engine(result(queue=9, prefill=9, run=99))  # settled again (a stream's usage chunk, then its end)
    assert timings.seconds["decode"] == 1.5
    replay = Timings(started=0.0)
    replay.engine(result(queue=0.25, prefill=0.5, run=2.0), replayed=True)  # the cached answer's own times
    assert replay.seconds["queue"] == replay.seconds["prefill"] == replay.seconds["decode"] == 0


def test_the_header_is_w3c_server_timing_in_milliseconds():
    timings = Timings(started=0.0)
    timings.lap("auth", now=0.0012345)
    header = timings.header(total=0.5)
    entries = [entry.split(";dur=") for entry in header.split(", ")]
    assert [name for name, _ in entries] == [*PHASES, "total"]
    assert dict(entries)["auth"] == "1.234" and dict(entries)["total"] == "500" and dict(entries)["queue"] == "0"


@pytest.mark.parametrize("setting,scopes,seen", [
    ("on", (), True), ("on", ("generate",), True), ("admin", ("generate",), False), ("admin", ("admin",), True),
    ("admin", ("generate", "admin"), True), ("off", ("admin",), False),
])
def test_who_sees_them(setting, scopes, seen):
    assert shown(setting, scopes) is seen
