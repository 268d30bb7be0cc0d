"""Set-up functions for worker processes in tests (a spawned worker imports its set-up by name)."""

from __future__ import annotations

import os
import time


def echo(fail_on: str | None = None, end_on: str | None = None, sleep: float = 0.0):
    """A work function that gives its payload upper-cased; on `fail_on` it raises, on `end_on` its process
    ends without a word."""

    def work(payload: str) -> str:
        time.sleep(sleep)
        if payload == fail_on:
            raise ValueError(f"cannot do {payload}")
        if payload == end_on:
            os._exit(3)
        return payload.upper()

    return work


def broken():
    raise OSError("no model here")


def nap():
    """A work function that sleeps its payload's seconds."""

    def work(payload: str) -> str:
        time.sleep(float(payload))
        return payload

    return work
