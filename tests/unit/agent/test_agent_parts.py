"""The agent's own parts: back-off delays, progress documents, cancellation, how outcomes read."""

from __future__ import annotations

import pytest

from hozon.agent.client import Assignment, transient
from hozon.agent.daemon import Backoff
from hozon.agent.jobs import Progress, RunCancelled
from hozon.errors import ServerError


def test_backoff_doubles_up_to_its_cap_with_jitter_in_the_upper_half() -> None:
    backoff = Backoff(first=1.0, cap=8.0)
    ceilings = [1.0, 2.0, 4.0, 8.0, 8.0, 8.0]
    for ceiling in ceilings:
        delay = backoff.delay()
        assert ceiling / 2 <= delay <= ceiling
    backoff.reset()
    assert backoff.delay() <= 1.0
    spread = {round(Backoff().delay(), 6) for _ in range(50)}
    assert len(spread) > 10  # many agents do not retry in step


def test_progress_reports_bytes_rate_and_current_item_and_cancels_the_backup() -> None:
    progress = Progress()
    progress.image(50, 200)
    doc = progress.snapshot()
    assert doc["bytes_read"] == 50 and doc["current"] == "25% of 200 bytes" and doc["rate"] > 0
    assert progress.snapshot()["rate"] == 0  # nothing read since the last report
    progress.cancel("agent a1 was stopped during the run (SIGTERM)")
    progress.cancel("a later reason does not replace the first")
    with pytest.raises(RunCancelled, match=r"agent a1 was stopped during the run \(SIGTERM\)"):
        progress.image(60, 200)


def test_which_failures_are_worth_trying_again() -> None:
    assert transient(ServerError("cannot reach the server", 0))
    assert transient(ServerError("bad gateway", 502))
    assert not transient(ServerError("revoked", 401))
    assert not transient(ServerError("no longer held", 409))


def test_an_assignment_is_read_from_the_poll_answer() -> None:
    run = Assignment.from_doc({"id": 42, "trigger": "schedule", "queued_at": "…", "lease_seconds": 60,
                               "job": {"name": "web-etc", "kind": "files", "namespace": "web",
                                       "spec": {"paths": ["/etc"]}}})
    assert (run.run_id, run.job, run.kind, run.namespace, run.spec, run.lease_seconds) == (
        42, "web-etc", "files", "web", {"paths": ["/etc"]}, 60.0)
