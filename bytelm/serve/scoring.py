"""Scoring for /v1/score, off the event loop and fair: texts take turns on the model a chunk at a time, and a
text whose client has gone stops at its next chunk. bytelm/serve/app.py's route uses it.

    scorer = Scorer(model, max_queue=32)
    with scorer.admitted():                                   # ScoreBusy when max_queue texts already wait
        scores = await asyncio.to_thread(scorer.score, data, top_k, gone)   # ClientGone once `gone` is set

The numbers are bytelm.codec.score.score_bytes's, as `bytelm score` gives them: the turns are taken in its
progress callback, between windows, so chunking never changes a score. One text is scored at a time (each
pass already fills the cores) and at most `max_queue` more wait, as generation's queue.
"""
from __future__ import annotations

import threading
from collections import deque
from contextlib import contextmanager

import torch

CHUNK_POSITIONS = 4096  # positions scored between turns: about one forward pass of score_bytes


class ScoreBusy(Exception):
    """The scoring queue is full: answer 503 and ask the client to retry."""


class ClientGone(Exception):
    """The client left while its text was being scored; nobody reads the answer."""


class _Turns:
    """A first-come first-served turn on the model. The holder passes its turn on after each chunk when others
    wait and queues again behind them, so a short text waits for one chunk of each long one, not all of it."""

    def __init__(self):
        self._cond = threading.Condition()
        self._line: deque = deque()  # the holder first, then the waiting, in arrival order

    def _wait_for_turn(self, ticket) -> None:
        while self._line[0] is not ticket:
            self._cond.wait()

    @contextmanager
    def turn(self):
        ticket = object()
        with self._cond:
            self._line.append(ticket)
            self._wait_for_turn(ticket)
        try:
            yield lambda: self._pass_on(ticket)
        finally:
            with self._cond:
                self._line.remove(ticket)
                self._cond.notify_all()

    def _pass_on(self, ticket) -> None:
        with self._cond:
            if len(self._line) > 1:
                self._line.rotate(-1)  # the holder goes to the back of the line
                self._cond.notify_all()
                self._wait_for_turn(ticket)


class Scorer:
    """Scores texts with one model for every client (see the module docstring). Thread-safe."""

    def __init__(self, model: torch.nn.Module, max_queue: int):
        self.model, self.max_queue = model, max_queue
        self._turns = _Turns()
        self._lock = threading.Lock()
        self.in_flight = 0  # texts admitted and not yet answered: the one scoring plus the waiting

    @contextmanager
    def admitted(self):
        with self._lock:
            if self.in_flight > self.max_queue:  # one scoring and max_queue waiting already
                raise ScoreBusy(f"{self.max_queue} texts are already waiting to be scored")
            self.in_flight += 1
        try:
            yield
        finally:
            with self._lock:
                self.in_flight -= 1

    def score(self, data: bytes, top_k: int, gone: threading.Event):
        """bytelm.codec.score.score_bytes(model, data, top_k=top_k), in turns; ClientGone once `gone` is set."""
        from bytelm.codec.score import score_bytes
        since_turn = 0

        def between_windows(done: int, total: int) -> None:
            nonlocal since_turn
            if done >= total or done - since_turn < CHUNK_POSITIONS:
                return
            since_turn = done
            if gone.is_set():
                raise ClientGone()
            pass_on()

        if gone.is_set():
            raise ClientGone()
        with self._turns.turn() as pass_on:
            if gone.is_set():  # it left while waiting for its first turn
                raise ClientGone()
            return score_bytes(self.model, data, top_k=top_k, progress=between_windows)
