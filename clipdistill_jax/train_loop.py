"""The parts of the trainer's loop that keep the devices busy: batches placed ahead, metrics
kept on the devices between log steps, a step clock that pauses.

The host never waits for a step to finish except at log, evaluation and save steps (and to
keep at most `max_in_flight` steps queued): it dispatches step s, then reads, tokenizes and
places the batch of step s + 2 while the devices run s. As in big_vision's train loop
(u.prefetch_iterator, u.chrono) and clu's metric accumulation:

  * prefetch_to_mesh: a deque of `size` batches already sharded onto the mesh, each with the
    reader's state after it, so a checkpoint saved after step s stores the position after
    the batch of step s, however far ahead the iterator has read;
  * MetricsAccumulator: the step's metrics summed on the devices; the first step whose loss
    is NaN/inf, and its metrics, kept there too (the non-finite guard), read at log steps and
    before every evaluation and save;
  * StepClock: training wall time with evaluation and checkpoint time left out, and the part
    of it spent waiting for input.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import time
from collections.abc import Callable, Iterator
from typing import Any

import jax
import jax.numpy as jnp

from clipdistill_jax import sharding
from clipdistill_jax.data import pipeline

# Metrics that describe the state rather than the step: logged as the last step's value.
LAST_VALUE_METRICS = ("learning_rate", "logit_scale")


@dataclasses.dataclass
class PlacedBatch:
  """One step's batch on the mesh, with the host iterator's state right after it."""
  step: int                      # the loop step (1-based) that trains on it
  batch: dict[str, jax.Array]    # global arrays, batch dim split over ('data', 'fsdp')
  reader_state: dict[str, int]   # this host's iterator.state() after this batch
  data_metrics: dict[str, float]  # this host's iterator.metrics() after this batch


def prefetch_to_mesh(batches: Iterator[dict], mesh: jax.sharding.Mesh, *, start_step: int,
                     end_step: int | None = None, size: int = 2,
                     transform: Callable[[dict, int], dict] | None = None
                     ) -> Iterator[PlacedBatch]:
  """Batches of steps start_step + 1, ..., end_step (endless for None), each sharded onto
  `mesh` up to `size` steps ahead; nothing is read past end_step's batch.

  batches: a host iterator with state() and metrics() (data/pipeline.py). transform(batch,
  step - 1): applied to the host batch before placing (the teacher cache's merge). The batch
  of step s is yielded once the one of step s + size - 1 has been placed, so that with the
  step dispatched between two next() calls, the host reads and places ahead of the devices.
  flax.jax_utils.prefetch_to_device does the same without shardings. Raises what the
  iterator raises (StopIteration ends it).
  """
  if size < 1:
    raise ValueError(f"prefetch size={size} must be >= 1.")
  queue: collections.deque[PlacedBatch] = collections.deque()
  step = start_step

  def place() -> None:
    nonlocal step
    step += 1
    host = next(batches)
    if transform is not None:
      host = transform(host, step - 1)
    queue.append(PlacedBatch(
        step, sharding.shard_host_batch(pipeline.without_example_fields(host), mesh),
        dict(batches.state()), dict(batches.metrics())))

  exhausted = False
  while True:
    while not exhausted and len(queue) < size and (end_step is None or step < end_step):
      try:
        place()
      except StopIteration:
        exhausted = True
    if not queue:
      return
    yield queue.popleft()


@jax.jit
def _accumulate(acc: dict | None, metrics: dict, step: jax.Array) -> dict:
  bad_now = ~jnp.isfinite(metrics["loss/total"])
  if acc is None:  # the first step of a log interval (traced once, like any other shape)
    return {"sum": metrics, "bad_step": jnp.where(bad_now, step, 0).astype(jnp.int32),
            "bad": metrics}
  first_bad = (acc["bad_step"] == 0) & bad_now
  return {"sum": jax.tree_util.tree_map(jnp.add, acc["sum"], metrics),
          "bad_step": jnp.where(first_bad, step, acc["bad_step"]).astype(jnp.int32),
          "bad": jax.tree_util.tree_map(lambda b, m: jnp.where(first_bad, m, b), acc["bad"],
                                        metrics)}


class MetricsAccumulator:
  """A log interval's step metrics, kept on the devices (clu's Average, on device).

  add(metrics, step) dispatches one small jitted update and returns at once. mean() fetches
  the interval's means (LAST_VALUE_METRICS: the last step's values) and starts a new
  interval. first_non_finite() fetches only the non-finite guard: (step, that step's
  metrics) for the first step of the interval whose loss/total was NaN/inf, or None; the
  guard is never reset by mean(), which the trainer calls only after checking it.
  """

  def __init__(self) -> None:
    self._acc: dict | None = None
    self._last: dict | None = None
    self._count = 0
    self._bad: tuple[int, dict] | None = None

  @property
  def count(self) -> int:
    """Steps added since the last mean()."""
    return self._count

  def add(self, metrics: dict[str, jax.Array], step: jax.Array | int) -> None:
    self._acc = _accumulate(self._acc, metrics, jnp.asarray(step, jnp.int32))
    self._last, self._count = metrics, self._count + 1

  def block_until_ready(self) -> None:
    """Waits for every step added so far to finish (before pausing the clock)."""
    jax.block_until_ready(self._acc)

  def first_non_finite(self) -> tuple[int, dict[str, float]] | None:
    if self._bad is None and self._acc is not None:
      step = int(jax.device_get(self._acc["bad_step"]))
      if step:
        bad = jax.device_get(self._acc["bad"])
        self._bad = (step, {k: float(v) for k, v in bad.items()})
    return self._bad

  def mean(self) -> dict[str, float]:
    if self._acc is None:
      return {}
    sums, last = jax.device_get((self._acc["sum"], self._last))
    out = {k: float(last[k]) if k in LAST_VALUE_METRICS else float(v) / self._count
           for k, v in sums.items()}
    self._acc, self._last, self._count = None, None, 0
    return out


class StepClock:
  """Training wall time with evaluation and checkpointing left out (big_vision's chrono),
  and how much of it went to waiting for input.

  lap() -> (training seconds, input-wait seconds) since the previous lap (or the start),
  time spent inside paused() excluded from both; waiting() marks time spent in the input
  iterator. Times are time.perf_counter() seconds.
  """

  def __init__(self) -> None:
    self._start = time.perf_counter()
    self._paused = 0.0
    self._waited = 0.0

  @contextlib.contextmanager
  def _timed(self, counter: str):
    began = time.perf_counter()
    try:
      yield
    finally:
      setattr(self, counter, getattr(self, counter) + time.perf_counter() - began)

  def paused(self):
    return self._timed("_paused")

  def waiting(self):
    return self._timed("_waited")

  def lap(self) -> tuple[float, float]:
    now = time.perf_counter()
    train_s = max(now - self._start - self._paused, 1e-9)
    waited = self._waited
    self._start, self._paused, self._waited = now, 0.0, 0.0
    return train_s, waited


class InFlight:
  """Bounds how many dispatched steps the host may run ahead of the devices: add() waits
  for the oldest step's output once more than `limit` are queued (device memory for their
  batches stays bounded; the devices still have `limit` steps to run)."""

  def __init__(self, limit: int = 2) -> None:
    self._limit = limit
    self._queue: collections.deque[Any] = collections.deque()

  def add(self, output: Any) -> None:
    self._queue.append(output)
    while len(self._queue) > self._limit:
      jax.block_until_ready(self._queue.popleft())
