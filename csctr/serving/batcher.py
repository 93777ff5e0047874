"""Micro-batching: concurrent requests merged into one jitted head call.

The HTTP event loop parses and checks requests; this thread takes them off a
queue, merges up to `max_candidates` candidates (and `max_requests`
requests) into one batch, has the current model version score it in one
call per compiled bucket, and hands each request its slice. While a batch is
being scored, the next requests queue up, so under load batches grow by
themselves; `max_wait_s` (small, default 0.5 ms) bounds how long a batch
that is not full waits for company. The jitted call releases the GIL, so the
event loop parses the next requests meanwhile: the two threads use both
cores.

Hot swap: the version is read once per batch (an attribute read is atomic in
Python), so every request of a batch, and so every response, is scored by
exactly one version, and a swap between batches loses nothing.
"""

from __future__ import annotations

import asyncio
import queue
import threading
import time
from typing import Any, Callable

from absl import logging

from csctr.serving import schema


class MicroBatcher:
  """A thread that scores queued requests in merged batches.

  Args:
    version_fn: returns the version to score the next batch with; it must
      have `score_batch(list[ParsedRequest]) -> list[result | BadRequest]`.
    max_candidates: candidates per merged batch (the largest bucket).
    max_requests: requests per merged batch.
    max_wait_s: how long a batch that is not full waits for more requests.
    on_batch: called with (requests, candidates, seconds) after each batch.
  """

  def __init__(self, version_fn: Callable[[], Any], max_candidates: int,
               max_requests: int, max_wait_s: float,
               on_batch: Callable[[int, int, float], None] | None = None):
    self._version_fn = version_fn
    self.max_candidates, self.max_requests = max_candidates, max_requests
    self.max_wait_s = max_wait_s
    self._on_batch = on_batch
    self._queue: queue.SimpleQueue = queue.SimpleQueue()
    self._carry = None  # a request that did not fit the previous batch
    self._thread = threading.Thread(target=self._run, name="micro-batcher",
                                    daemon=True)
    self._stopped = False
    self._thread.start()

  def submit(self, request: schema.ParsedRequest) -> asyncio.Future:
    """Queues a request; the future resolves in the caller's event loop."""
    loop = asyncio.get_running_loop()
    future = loop.create_future()
    self._queue.put((request, future, loop))
    return future

  def stop(self) -> None:
    self._stopped = True
    self._queue.put(None)
    self._thread.join(timeout=10)

  # ------------------------------------------------------------ thread

  def _next_batch(self) -> list | None:
    first = self._carry if self._carry is not None else self._queue.get()
    self._carry = None
    # Requests whose client hung up (the future was cancelled when the
    # connection closed) are dropped unscored: under overload, the server
    # then spends its time on requests someone still waits for.
    while first is not None and first[1].done():
      first = self._queue.get()
    if first is None:
      return None
    batch, total = [first], first[0].n
    deadline = time.perf_counter() + self.max_wait_s
    while total < self.max_candidates and len(batch) < self.max_requests:
      try:  # what is queued already, then wait until the deadline
        item = self._queue.get_nowait()
      except queue.Empty:
        wait = deadline - time.perf_counter()
        if wait <= 0:
          break
        try:
          item = self._queue.get(timeout=wait)
        except queue.Empty:
          break
      if item is None:
        self._queue.put(None)
        break
      if item[1].done():  # its client went away (connection closed)
        continue
      if total + item[0].n > self.max_candidates:
        self._carry = item
        break
      batch.append(item)
      total += item[0].n
    return batch

  def _run(self) -> None:
    while not self._stopped:
      batch = self._next_batch()
      if batch is None:
        return
      start = time.perf_counter()
      try:
        results = self._version_fn().score_batch([b[0] for b in batch])
      except Exception as e:  # pylint: disable=broad-except
        logging.exception("scoring a batch of %d requests failed", len(batch))
        results = [e] * len(batch)
      seconds = time.perf_counter() - start
      if self._on_batch is not None:
        self._on_batch(len(batch), sum(b[0].n for b in batch), seconds)
      by_loop: dict[Any, list] = {}
      for (_, future, loop), result in zip(batch, results):
        by_loop.setdefault(loop, []).append((future, result))
      for loop, pairs in by_loop.items():  # one wake-up per loop and batch
        loop.call_soon_threadsafe(_resolve, pairs)


def _resolve(pairs: list) -> None:
  for future, result in pairs:
    if future.done():  # the client went away
      continue
    if isinstance(result, BaseException):
      future.set_exception(result)
    else:
      future.set_result(result)
