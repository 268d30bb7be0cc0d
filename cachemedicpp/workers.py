"""Worker processes that compute a phase's units while the phase process keeps the run's files.

A worker starts with the "spawn" start method: it inherits nothing but what it is handed (no model, no open
file, no lock of the run dir), sets its torch thread count, and calls a set-up function, named by import
path, that builds what its units need and returns the work function. It then takes one unit at a time over
its own pipe and sends back the result, or the traceback of what the unit raised.

Signals: a worker ignores SIGINT and SIGTERM. Ctrl-C reaches the whole process group, and the phase process
turns it into a pause that lets the units in flight finish; the phase process stops the workers itself. A
worker exits as soon as the phase process does, even one killed with SIGKILL (it watches its parent).
"""

from __future__ import annotations

import multiprocessing as mp
import os
import signal
import threading
import traceback
from dataclasses import dataclass
from multiprocessing.connection import Connection, wait
from typing import Any, Callable

STOP = None  # the message that ends an idle worker
STOP_WAIT = 10.0  # seconds an idle worker gets to exit before it is killed


class RemoteTraceback(Exception):
    """A worker's traceback, as the cause of the error the phase raises (printed above it)."""

    def __str__(self) -> str:
        return self.args[0]


class WorkerFailed(RuntimeError):
    """A worker raised or ended while it had work: the phase fails (exit 1) with the unit named."""


@dataclass
class Outcome:
    """What a worker reported: the result of unit `key`, or `error` (its traceback, or how it ended)."""

    worker: int
    key: str | None  # the unit it was given (None: it ended while idle)
    value: Any = None
    error: str | None = None


def _exit_with_parent() -> None:
    parent = mp.parent_process()
    if parent is None:
        return

    def watch() -> None:
        wait([parent.sentinel])  # readable once the parent has ended, however it ended
        os._exit(1)

    threading.Thread(target=watch, name="exit-with-parent", daemon=True).start()


def _serve(conn: Connection, setup: Callable[..., Callable[[Any], Any]], args: tuple, threads: int | None) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    _exit_with_parent()
    if threads is not None:
        import torch

        torch.set_num_threads(threads)
    key = None
    try:
        work = setup(*args)
        while True:
            try:
                msg = conn.recv()
            except EOFError:  # the parent closed its end
                return
            if msg is STOP:
                return
            key, payload = msg
            conn.send((key, work(payload), None))
            key = None
    except BaseException:
        what = "while starting" if key is None else "on this unit"
        conn.send((key, None, f"{what}:\n{traceback.format_exc()}"))


class Pool:
    """`n` worker processes, each set up by `setup(*args)` with `threads` torch threads (None: torch's
    default). `give` hands an idle worker a unit, `collect` waits for outcomes; `close` (also on leaving a
    `with` block) stops the idle workers and kills the others."""

    def __init__(self, n: int, setup: Callable[..., Callable[[Any], Any]], args: tuple = (),
                 threads: int | None = None, name: str = "worker"):
        ctx = mp.get_context("spawn")
        self.procs: list = []
        self.conns: list[Connection] = []
        self.busy: dict[int, str] = {}  # worker -> the key of the unit it has
        self.ended: set[int] = set()
        try:
            for i in range(n):
                here, there = ctx.Pipe()
                p = ctx.Process(target=_serve, args=(there, setup, tuple(args), threads), name=f"{name}-{i}",
                                daemon=True)
                p.start()
                there.close()
                self.procs.append(p)
                self.conns.append(here)
        except BaseException:
            self.close()
            raise

    def __enter__(self) -> "Pool":
        return self

    def __exit__(self, *exc) -> bool:
        self.close()
        return False

    def idle(self) -> list[int]:
        return [i for i in range(len(self.procs)) if i not in self.busy and i not in self.ended]

    def give(self, worker: int, key: str, payload: Any) -> None:
        self.busy[worker] = key
        try:
            self.conns[worker].send((key, payload))
        except OSError:  # it has ended: `collect` reports it with this unit
            pass

    def collect(self) -> list[Outcome]:
        """Wait until a worker reports or ends; every outcome then ready. A worker that ended without
        reporting is an outcome with an error (the unit it had, if any)."""
        live = [i for i in range(len(self.procs)) if i not in self.ended]
        conns = {self.conns[i]: i for i in live}
        sentinels = {self.procs[i].sentinel: i for i in live}
        ready = wait(list(conns) + list(sentinels))
        out: list[Outcome] = []
        for r in ready:
            i = conns.get(r)
            if i is None:
                continue
            try:
                key, value, error = r.recv()
            except (EOFError, OSError):  # it ended without a word: its sentinel is ready too
                continue
            self.busy.pop(i, None)
            out.append(Outcome(i, key, value, error))
            if error is not None:
                self.ended.add(i)  # it exits after reporting an error
        reported = {o.worker for o in out}
        for r in ready:
            i = sentinels.get(r)
            # what a worker sent before it ended is read above, in this very round (its pipe was ready first)
            if i is None or i in self.ended or i in reported:
                continue
            self.ended.add(i)
            self.procs[i].join()
            out.append(Outcome(i, self.busy.pop(i, None),
                               error=f"the worker process ended (exit code {self.procs[i].exitcode})"))
        return out

    def close(self) -> None:
        for i, (p, c) in enumerate(zip(self.procs, self.conns)):
            if i not in self.busy and p.is_alive():
                try:
                    c.send(STOP)
                except OSError:
                    pass
        for i, p in enumerate(self.procs):
            if i not in self.busy:
                p.join(STOP_WAIT)
        for p in self.procs:
            if p.is_alive():
                p.kill()  # a unit in flight: its result would not be kept
            p.join()
        for c in self.conns:
            c.close()
        self.procs, self.conns, self.busy = [], [], {}
