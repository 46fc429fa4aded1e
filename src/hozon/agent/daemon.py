"""``hozon agent run``: take runs from the server and carry them out, for as long as the agent runs.

The agent holds no inbound port: it long-polls the server (``POST /agent/poll``, held up to 25 s)
and runs what it is handed, up to ``parallel`` runs at once, each on its own thread with a reporter
thread that sends its progress every few seconds (which renews the run's lease). When the server
cannot be reached it tries again with exponential back-off (capped, with jitter), and it logs one
line per change of state, never one per retry.

Stopping (SIGTERM, SIGINT): no more polls; runs in progress are cancelled at their next progress
callback and reported failed with that reason (a VM's state is undone by the backup's guardian),
then the daemon returns. A revoked credential (401) stops it with one sentence.
"""

from __future__ import annotations

import logging
import random
import signal
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from types import FrameType

from hozon.agent.client import POLL_WAIT, AgentClient, Assignment, transient
from hozon.agent.config import AgentConfig
from hozon.agent.jobs import Outcome, Progress, VmGuard, execute
from hozon.errors import ServerError

log = logging.getLogger("hozon.agent")

BACKOFF_FIRST = 1.0  # seconds before the first retry
BACKOFF_CAP = 60.0  # the longest wait between tries
REPORT_EVERY = 5.0  # seconds between progress reports (at most a third of the lease)
FINISH_PATIENCE = 600.0  # seconds to keep trying to report a run's end while the server is away


class Backoff:
    """Exponential delays, capped, each drawn from its upper half (jitter spreads many agents out)."""

    def __init__(self, first: float = BACKOFF_FIRST, cap: float = BACKOFF_CAP) -> None:
        self.first, self.cap = first, cap
        self.reset()

    def reset(self) -> None:
        self._next = self.first

    def delay(self) -> float:
        ceiling = self._next
        self._next = min(self._next * 2, self.cap)
        return random.uniform(ceiling / 2, ceiling)


class _PollInterrupted(BaseException):
    """Raised in the main thread by a stop signal while it waits on a poll."""


def revoked_error(config: AgentConfig, exc: ServerError) -> ServerError:
    return ServerError(f"the server at {config.url} no longer accepts agent {config.name}'s credential "
                       f"({exc.message.rpartition(': ')[2]}); the agent stops", 401,
                       hint="if it was revoked on purpose, remove the agent; otherwise enrol it again")


class Daemon:
    def __init__(self, config: AgentConfig, parallel: int = 1) -> None:
        self.config = config
        self.parallel = max(1, parallel)
        self.guard = VmGuard(config.directory)
        self._stop = threading.Event()
        self._stop_reason = ""
        self._fatal: ServerError | None = None
        self._slots = threading.Semaphore(self.parallel)
        self._running: dict[int, Progress] = {}
        self._threads: list[threading.Thread] = []
        self._mutex = threading.Lock()
        self._state = ""
        self._polling = False

    # -- state and stopping -------------------------------------------------------------------
    def _enter(self, state: str, line: str) -> None:
        """Log ``line`` only when the daemon's state changes (not for every retry in one state)."""
        with self._mutex:
            if state == self._state:
                return
            self._state = state
        log.info("%s", line)

    def stop(self, why: str) -> None:
        """Poll no more; cancel the runs in progress (each is reported failed with ``why``)."""
        self._stop_reason = self._stop_reason or why
        self._stop.set()
        with self._mutex:
            for progress in self._running.values():
                progress.cancel(f"agent {self.config.name} was stopped during the run ({why})")

    def _signalled(self, signum: int, frame: FrameType | None) -> None:
        self.stop(f"{signal.Signals(signum).name}")
        if self._polling:
            raise _PollInterrupted

    @contextmanager
    def signals(self) -> Iterator[None]:
        """SIGTERM and SIGINT stop the daemon (main thread only) for the duration of the block."""
        previous = {s: signal.signal(s, self._signalled) for s in (signal.SIGTERM, signal.SIGINT)}
        try:
            yield
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)

    # -- the poll loop ------------------------------------------------------------------------
    def run(self) -> None:
        """Poll and work until stopped; a ServerError if the server refuses this agent for good."""
        log.info("agent %s of namespace %s starts; server %s, up to %d run(s) at once", self.config.name,
                 self.config.namespace, self.config.url, self.parallel)
        backoff = Backoff()
        with AgentClient(self.config) as client:
            while not self._stop.is_set() and self._fatal is None:
                if not self._slots.acquire(timeout=1.0):
                    continue
                try:
                    run = self._poll(client)
                except ServerError as exc:
                    self._slots.release()
                    if not transient(exc):  # revoked, or a refusal no retry mends: stop, runs included
                        self._fatal = revoked_error(self.config, exc) if exc.status == 401 else exc
                        break
                    self._enter("away", f"the server cannot be reached ({exc.message}); trying again with "
                                        "back-off until it answers")
                    self._stop.wait(backoff.delay())
                    continue
                backoff.reset()
                self._enter("connected", f"connected to {self.config.url}")
                if run is None:
                    self._slots.release()
                    continue
                self._start(run)
        self.stop(self._stop_reason or ("revoked" if self._fatal and self._fatal.status == 401
                                        else "the server refused its poll"))
        for thread in self._threads:
            thread.join()
        if self._fatal is not None:
            raise self._fatal
        log.info("agent %s stopped (%s)", self.config.name, self._stop_reason)

    def _poll(self, client: AgentClient) -> Assignment | None:
        """A poll a stop signal may interrupt (a run the server handed out meanwhile lapses on the server)."""
        try:
            try:
                self._polling = True
                return None if self._stop.is_set() else client.poll(POLL_WAIT)
            finally:
                self._polling = False
        except _PollInterrupted:
            return None

    def _start(self, run: Assignment) -> None:
        progress = Progress()
        with self._mutex:
            self._running[run.run_id] = progress
            if self._stop.is_set():
                progress.cancel(f"agent {self.config.name} was stopped before the run began ({self._stop_reason})")
        thread = threading.Thread(target=self._work, args=(run, progress), name=f"hozon-run-{run.run_id}")
        self._threads = [t for t in self._threads if t.is_alive()] + [thread]
        thread.start()

    # -- one run ------------------------------------------------------------------------------
    def _work(self, run: Assignment, progress: Progress) -> None:
        log.info("run %d of job %s (%s) started", run.run_id, run.job, run.kind)
        try:
            with AgentClient(self.config) as client:
                with self._reporting(client, run, progress):
                    try:
                        outcome = execute(self.config, run, progress, self.guard)
                    except Exception as exc:  # a bug: the run still ends, with what went wrong
                        log.exception("run %d of job %s", run.run_id, run.job)
                        outcome = Outcome("failed", f"the agent failed with an internal error: {exc!r}")
                if progress.cancelled and outcome.state == "failed":
                    outcome.reason = progress.cancelled
                self._report_end(client, run, outcome)
        finally:
            with self._mutex:
                self._running.pop(run.run_id, None)
            self._slots.release()

    @contextmanager
    def _reporting(self, client: AgentClient, run: Assignment, progress: Progress) -> Iterator[None]:
        """Send the run's progress every few seconds until the block ends (this keeps its lease)."""
        done = threading.Event()
        every = min(REPORT_EVERY, run.lease_seconds / 3)

        def report() -> None:
            while not done.wait(every):
                try:
                    client.progress(run.run_id, progress.snapshot())
                    self._enter("connected", f"connected to {self.config.url}")
                except ServerError as exc:
                    if exc.status == 401:
                        self._fatal = revoked_error(self.config, exc)
                        progress.cancel(self._fatal.message)
                    elif exc.status == 409:
                        progress.cancel(exc.message)
                    elif transient(exc):  # the lease is renewed by the next report that gets through
                        self._enter("away", f"the server cannot be reached ({exc.message}); run {run.run_id} goes "
                                            "on and reports again when it answers")

        reporter = threading.Thread(target=report, name=f"hozon-report-{run.run_id}", daemon=True)
        reporter.start()
        try:
            yield
        finally:
            done.set()
            reporter.join()

    def _report_end(self, client: AgentClient, run: Assignment, outcome: Outcome) -> None:
        """Send the run's log lines, then its end, through short absences of the server."""
        backoff = Backoff()
        waited = 0.0
        sent_lines = not outcome.lines
        while True:
            try:
                if not sent_lines:
                    client.log(run.run_id, outcome.lines)
                    sent_lines = True
                client.finish(run.run_id, outcome.report())
                self._enter("connected", f"connected to {self.config.url}")
                break
            except ServerError as exc:
                if not transient(exc) or waited > FINISH_PATIENCE or (self._stop.is_set() and waited > 30):
                    log.warning("run %d of job %s ended %s, but the server did not take it: %s", run.run_id, run.job,
                                outcome.state, exc.message)
                    if exc.status == 401:
                        self._fatal = revoked_error(self.config, exc)
                    return
                delay = backoff.delay()
                waited += delay
                time.sleep(delay)
        reason = f": {outcome.reason}" if outcome.reason else ""
        snapshot = f", snapshot {outcome.snapshot_id[:8]}" if outcome.snapshot_id else ""
        log.info("run %d of job %s %s%s%s", run.run_id, run.job, outcome.state, snapshot, reason)
