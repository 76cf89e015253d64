"""Recovery shared by the processes of a shared-RDB study (`--storage`, docs/distributed.md).

The `llmpareto search --storage ...` process (the coordinator) posts each round's points to a
job board, a table of the study's own database, and works on them; every `llmpareto worker` of
the study, its trials done, claims points from the same board until the coordinator says the
recovery is over. Workers share no disk with the coordinator, so a worker's outcome (its
columns and, when the point keeps them, the recovered weights as a safetensors file in parts
of `PART_BYTES`) goes to the board, and the coordinator writes it into its run directory and
the study, as it does the points it recovers itself. A point of a later round that continues
from weights an earlier round kept carries them the other way, in parts numbered -1, -2, ...

A claim is one UPDATE that only a queued row passes (atomic on PostgreSQL, MySQL and SQLite).
A running point's process beats its row every `HEARTBEAT_S`; a row silent for `GRACE_S` is
queued again, so a killed worker's point is taken by another process. A killed coordinator
loses nothing either: `search --resume` posts the points still missing, takes the outcomes
workers finished meanwhile from the board, and goes on.
"""

from __future__ import annotations

import datetime
import json
import os
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

import sqlalchemy as sa

from llmpareto.recipe import Recipe
from llmpareto.search.recover import Job, Outcome

HEARTBEAT_S = 5
GRACE_S = 30
POLL_S = 1.0
WAIT_S = 120  # a worker whose trials are done waits this long for a coordinator to appear
PART_BYTES = 64 << 20  # weights travel in parts: no row near a database's value limits
COORDINATOR = (-1, 0)  # the (trial, steps) of the coordinator's own row
QUEUED, RUNNING, DONE, TAKEN, OVER = "queued", "running", "done", "taken", "over"

_META = sa.MetaData()
JOBS = sa.Table(
    "llmpareto_recovery", _META,
    sa.Column("study_id", sa.Integer, primary_key=True),
    sa.Column("trial", sa.Integer, primary_key=True),
    sa.Column("steps", sa.Integer, primary_key=True),
    sa.Column("state", sa.String(16), nullable=False),
    sa.Column("job", sa.Text),  # the recipe and the point's columns so far (JSON)
    sa.Column("worker", sa.String(300)),
    sa.Column("beat", sa.Float),  # the database's clock, seconds (see Board.now)
    sa.Column("columns", sa.Text),  # the outcome's columns (JSON)
    sa.Column("meta", sa.Text),  # the weights file's metadata (JSON), when there are weights
    sa.Column("parts", sa.Integer),
)
PARTS = sa.Table(
    "llmpareto_recovery_weights", _META,
    sa.Column("study_id", sa.Integer, primary_key=True),
    sa.Column("trial", sa.Integer, primary_key=True),
    sa.Column("steps", sa.Integer, primary_key=True),
    sa.Column("part", sa.Integer, primary_key=True),
    sa.Column("data", sa.LargeBinary, nullable=False),
)


def _blob(weights: dict, meta: dict | None = None) -> bytes:
    from safetensors.torch import save

    return save(weights, metadata=meta)


def me() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


class Board:
    """The recovery job board of one study in its RDB storage."""

    def __init__(self, study) -> None:
        storage = study._storage
        storage = getattr(storage, "_backend", storage)  # optuna wraps RDBStorage in a cache
        self.engine = storage.engine
        self.study_id = study._study_id
        _META.create_all(self.engine, checkfirst=True)

    def _key(self, trial: int, steps: int):
        return ((JOBS.c.study_id == self.study_id) & (JOBS.c.trial == trial)
                & (JOBS.c.steps == steps))

    def now(self) -> float:
        """Seconds on the database's clock (every process compares beats on one clock)."""
        with self.engine.connect() as c:
            stamp = c.execute(sa.select(sa.func.current_timestamp())).scalar_one()
        if isinstance(stamp, str):  # SQLite: text, UTC
            stamp = datetime.datetime.fromisoformat(stamp)
        if stamp.tzinfo is None:  # SQLite's and MySQL's clocks are UTC
            stamp = stamp.replace(tzinfo=datetime.UTC)
        return stamp.timestamp()

    def post(self, jobs: list[Job]) -> None:
        """Queue `jobs` (a round's points) unless they are queued, running or done already."""
        with self.engine.begin() as c:
            have = {(r.trial, r.steps): r.state for r in c.execute(
                sa.select(JOBS.c.trial, JOBS.c.steps, JOBS.c.state)
                .where(JOBS.c.study_id == self.study_id))}
            for j in jobs:
                payload = json.dumps({"recipe": j.recipe.to_json(indent=None),
                                      "before": j.before, "rung": j.rung,
                                      "start_exact": None if j.start is None else j.start[1]})
                state = have.get((j.trial, j.steps))
                if state is None:
                    c.execute(JOBS.insert().values(study_id=self.study_id, trial=j.trial,
                                                   steps=j.steps, state=QUEUED, job=payload))
                elif state == TAKEN:  # taken before, yet not in the study: do it again
                    c.execute(JOBS.update().where(self._key(j.trial, j.steps))
                              .values(state=QUEUED, job=payload, worker=None, columns=None))
                else:
                    continue
                if j.start is not None:
                    self._put(c, j.trial, j.steps, _blob(j.start[0]), start=True)

    def requeue_stale(self) -> int:
        """Queue again the running points whose process has been silent for GRACE_S."""
        with self.engine.begin() as c:
            return c.execute(JOBS.update().where(
                (JOBS.c.study_id == self.study_id) & (JOBS.c.state == RUNNING)
                & (JOBS.c.trial >= 0) & (JOBS.c.beat < self.now() - GRACE_S))
                .values(state=QUEUED, worker=None)).rowcount

    def claim(self, trials: set[tuple[int, int]] | None = None) -> Job | None:
        """Take one queued point (of `trials`, if given) for this process, or None."""
        with self.engine.connect() as c:
            rows = c.execute(sa.select(JOBS.c.trial, JOBS.c.steps, JOBS.c.job).where(
                (JOBS.c.study_id == self.study_id) & (JOBS.c.state == QUEUED))
                .order_by(JOBS.c.steps, JOBS.c.trial)).all()
        for r in rows:
            if trials is not None and (r.trial, r.steps) not in trials:
                continue
            with self.engine.begin() as c:
                won = c.execute(JOBS.update().where(
                    self._key(r.trial, r.steps) & (JOBS.c.state == QUEUED))
                    .values(state=RUNNING, worker=me(), beat=self.now())).rowcount == 1
            if won:
                job = json.loads(r.job)
                start = None
                if job.get("start_exact") is not None:
                    from safetensors.torch import load

                    with self.engine.connect() as c:
                        start = load(self._get(c, r.trial, r.steps, start=True)), bool(
                            job["start_exact"])
                return Job(r.trial, Recipe.from_json(job["recipe"]), r.steps, job["before"],
                           job.get("rung", 0), start)
        return None

    def _parts(self, trial: int, steps: int, start: bool):
        where = ((PARTS.c.study_id == self.study_id) & (PARTS.c.trial == trial)
                 & (PARTS.c.steps == steps))
        return where & ((PARTS.c.part < 0) if start else (PARTS.c.part >= 0))

    def _put(self, c, trial: int, steps: int, blob: bytes, start: bool = False) -> int:
        """Store `blob` as a point's outcome weights (parts 0, 1, ...) or its start (-1, -2,
        ...), replacing those there; returns the number of parts."""
        c.execute(PARTS.delete().where(self._parts(trial, steps, start)))
        parts = [blob[i:i + PART_BYTES] for i in range(0, len(blob), PART_BYTES)]
        for i, data in enumerate(parts):
            c.execute(PARTS.insert().values(study_id=self.study_id, trial=trial, steps=steps,
                                            part=-1 - i if start else i, data=data))
        return len(parts)

    def _get(self, c, trial: int, steps: int, start: bool = False) -> bytes:
        order = PARTS.c.part.desc() if start else PARTS.c.part
        return b"".join(c.execute(sa.select(PARTS.c.data).where(
            self._parts(trial, steps, start)).order_by(order)).scalars())

    def release(self, job: Job) -> None:
        """Give a claimed point back (this process cannot finish it)."""
        with self.engine.begin() as c:
            c.execute(JOBS.update().where(self._key(job.trial, job.steps)
                                          & (JOBS.c.worker == me()))
                      .values(state=QUEUED, worker=None))

    @contextmanager
    def beating(self, trial: int, steps: int):
        """Beat the row of (trial, steps) every HEARTBEAT_S while the body runs."""
        stop = threading.Event()

        def beat() -> None:
            while not stop.wait(HEARTBEAT_S):
                try:
                    with self.engine.begin() as c:
                        c.execute(JOBS.update().where(self._key(trial, steps))
                                  .values(beat=self.now()))
                except Exception:  # noqa: BLE001, S112 - a lost beat only lets it be retaken
                    continue

        thread = threading.Thread(target=beat, daemon=True)
        thread.start()
        try:
            yield
        finally:
            stop.set()
            thread.join()

    def finish(self, job: Job, outcome: Outcome, state: str = DONE) -> None:
        """Store a point's outcome (the weights in parts) and mark it `state`."""
        blob = _blob(outcome.weights, outcome.meta) if outcome.weights else b""
        with self.engine.begin() as c:
            parts = self._put(c, job.trial, job.steps, blob)
            c.execute(JOBS.update().where(self._key(job.trial, job.steps)).values(
                state=state, columns=json.dumps(outcome.columns), parts=parts,
                meta=json.dumps(outcome.meta) if outcome.meta else None))

    def done(self, trials: set[tuple[int, int]]) -> Iterator[tuple[int, int, Outcome]]:
        """The finished outcomes of `trials` that nobody took yet, weights read back."""
        from safetensors.torch import load

        with self.engine.connect() as c:
            rows = c.execute(sa.select(JOBS.c.trial, JOBS.c.steps, JOBS.c.columns,
                                       JOBS.c.meta, JOBS.c.parts).where(
                (JOBS.c.study_id == self.study_id) & (JOBS.c.state == DONE))).all()
        for r in rows:
            if (r.trial, r.steps) not in trials:
                continue
            weights = None
            if r.parts:
                with self.engine.connect() as c:
                    weights = load(self._get(c, r.trial, r.steps))
            yield r.trial, r.steps, Outcome(json.loads(r.columns), weights,
                                            json.loads(r.meta) if r.meta else None)

    def taken(self, trial: int, steps: int) -> None:
        """The coordinator wrote the outcome: drop its weights from the board."""
        with self.engine.begin() as c:
            c.execute(PARTS.delete().where((PARTS.c.study_id == self.study_id)
                                           & (PARTS.c.trial == trial)
                                           & (PARTS.c.steps == steps)))
            c.execute(JOBS.update().where(self._key(trial, steps)).values(state=TAKEN))

    # ------------------------------------------------ the coordinator's presence

    def coordinator(self) -> tuple[str, float] | None:
        """The coordinator's state and seconds since its last beat, or None if none came."""
        with self.engine.connect() as c:
            row = c.execute(sa.select(JOBS.c.state, JOBS.c.beat).where(
                self._key(*COORDINATOR))).first()
        return None if row is None else (row.state, self.now() - (row.beat or 0))

    @contextmanager
    def coordinating(self):
        """This process coordinates recovery while the body runs; it says so when it ends
        (not when it is killed: workers see its row go silent)."""
        with self.engine.begin() as c:
            c.execute(JOBS.delete().where(self._key(*COORDINATOR)))
            c.execute(JOBS.insert().values(study_id=self.study_id, trial=COORDINATOR[0],
                                           steps=COORDINATOR[1], state=RUNNING, worker=me(),
                                           beat=self.now()))
        with self.beating(*COORDINATOR):
            yield
        with self.engine.begin() as c:
            c.execute(JOBS.update().where(self._key(*COORDINATOR)).values(state=OVER))


def pool(board: Board, claims: bool = True):
    """Recovery's rounds on the board: this process claims points and runs them itself
    (`here`; not when `claims` is False: --no-recover-here), and yields the outcomes workers
    post, until every point of the round is in."""

    def run(jobs: list[Job], here) -> Iterator[tuple[int, Outcome]]:
        board.post(jobs)
        wanted = {(j.trial, j.steps) for j in jobs}
        if wanted and not claims:
            print(f"recovery: {len(wanted)} points handed to the study's workers "
                  "(--no-recover-here)", flush=True)
        while wanted:
            board.requeue_stale()
            for trial, steps, outcome in list(board.done(wanted)):
                wanted.discard((trial, steps))
                yield trial, outcome
                board.taken(trial, steps)  # after the caller wrote it: a kill loses nothing
            job = board.claim(wanted) if claims else None
            if job is None:
                if wanted:
                    time.sleep(POLL_S)
                continue
            with board.beating(job.trial, job.steps):
                outcome = here(job)
            outcome.columns.update(recover_node=me(), recover_pid=os.getpid())
            board.finish(job, Outcome(outcome.columns), TAKEN)  # the weights stay here
            wanted.discard((job.trial, job.steps))
            yield job.trial, outcome
    return run


def serve(study, runner, settings, progress: bool = False) -> int:
    """A worker's part of recovery, once its trials are done: claim the coordinator's points
    and run them until it says recovery is over (or stays silent for GRACE_S, or never
    appears within WAIT_S). Returns how many points this process recovered."""
    from llmpareto.errors import UserError
    from llmpareto.search.recover import recover_point, recovery_measure

    if not settings.recover_steps:
        return 0
    board, n, since, measure, told = Board(study), 0, time.monotonic(), None, False
    while True:
        board.requeue_stale()
        job = board.claim()
        if job is not None:
            if measure is None:
                learn, measure = recovery_measure(runner)
            try:
                with board.beating(job.trial, job.steps):
                    outcome = recover_point(runner, job.recipe, job.trial, job.steps, learn,
                                            measure, settings, progress, job.before,
                                            job.rung, job.start)
            except (UserError, KeyboardInterrupt):  # e.g. out of GPU memory: let another try
                board.release(job)
                raise
            outcome.columns.update(recover_node=me(), recover_pid=os.getpid())
            board.finish(job, outcome)
            n, since = n + 1, time.monotonic()
            continue
        seen = board.coordinator()
        if seen is None and not n and not told:
            told = print("worker: trials done; waiting up to "
                         f"{WAIT_S} s for `llmpareto search --storage ... --resume` to recover "
                         "points with it", flush=True) or True
        if seen is not None and seen[0] == OVER:
            return n
        if seen is not None and seen[1] < GRACE_S:
            since = time.monotonic()  # a live coordinator: wait for its next round
        elif time.monotonic() - since > (WAIT_S if seen is None else GRACE_S):
            return n
        time.sleep(POLL_S)
