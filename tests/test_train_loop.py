"""The trainer's loop parts (train_loop.py): batches placed ahead keep the reader state of
the batch trained on, the on-device metrics and NaN/inf guard, the clock that pauses."""

import jax
import numpy as np
import pytest

from clipdistill_jax import sharding, train_loop


class CountingBatches:
  """Host batches numbered from 0; state() and metrics() as data/pipeline.py's iterators
  (every third record 'unreadable', so the position runs ahead of step x batch)."""

  def __init__(self, batch: int = 4, limit: int | None = None):
    self.batch, self.limit, self.served, self.position = batch, limit, 0, 0

  def __iter__(self):
    return self

  def __next__(self):
    if self.limit is not None and self.served == self.limit:
      raise StopIteration
    first = self.served * self.batch
    self.served += 1
    self.position += self.batch + 1  # one record dropped per batch
    return {"image": np.full((self.batch, 2), first, np.float32),
            "example_id": np.arange(first, first + self.batch)}

  def state(self):
    return {"position": self.position, "num_read": self.position,
            "num_skipped": self.served}

  def metrics(self):
    return {"data/num_read": float(self.position), "data/num_skipped": float(self.served)}


@pytest.fixture(scope="module")
def mesh():
  return sharding.make_mesh((1, 1, 1), devices=jax.devices()[:1])


def test_prefetch_keeps_each_batchs_reader_state_and_reads_only_size_ahead(mesh):
  batches = CountingBatches()
  merged = []

  def transform(batch, index):
    merged.append(index)
    return batch

  placed = train_loop.prefetch_to_mesh(batches, mesh, start_step=3, end_step=8, size=2,
                                       transform=transform)
  seen = []
  for item in placed:
    # When step s is handed out, the iterator has read the batch of step s + 1, no more.
    assert batches.served == min(item.step + 1, 8) - 3
    seen.append(item.step)
    # The state saved with step s is the reader's right after step s's batch.
    n = item.step - 3
    assert item.reader_state == {"position": 5 * n, "num_read": 5 * n, "num_skipped": n}
    assert item.data_metrics["data/num_skipped"] == n
    np.testing.assert_array_equal(np.asarray(item.batch["image"]), (n - 1) * 4)
    assert "example_id" not in item.batch  # what the step takes, not the example fields
  assert seen == [4, 5, 6, 7, 8]
  assert batches.served == 5  # nothing read past end_step's batch
  assert merged == [3, 4, 5, 6, 7]  # the teacher cache's step index, counted from 0


def test_prefetch_ends_with_a_finite_iterator(mesh):
  placed = train_loop.prefetch_to_mesh(CountingBatches(limit=3), mesh, start_step=0, size=2)
  assert [p.step for p in placed] == [1, 2, 3]
  with pytest.raises(ValueError, match="prefetch size=0"):
    next(train_loop.prefetch_to_mesh(CountingBatches(), mesh, start_step=0, size=0))


def step_metrics(loss, lr):
  return {"loss/total": jax.numpy.float32(loss), "learning_rate": jax.numpy.float32(lr)}


def test_metrics_are_means_and_the_guard_names_the_first_non_finite_step():
  acc = train_loop.MetricsAccumulator()
  for step, loss in zip((11, 12, 13), (1.0, 2.0, 6.0), strict=True):
    acc.add(step_metrics(loss, lr=step / 100), step)
  assert acc.count == 3 and acc.first_non_finite() is None
  mean = acc.mean()
  assert mean["loss/total"] == pytest.approx(3.0)
  assert mean["learning_rate"] == pytest.approx(0.13)  # the last step's, not the mean
  assert acc.count == 0

  for step, loss in zip((14, 15, 16, 17), (1.0, np.nan, np.inf, 2.0), strict=True):
    acc.add(step_metrics(loss, lr=step / 100), step)
  step, metrics = acc.first_non_finite()
  assert step == 15 and np.isnan(metrics["loss/total"])
  assert metrics["learning_rate"] == pytest.approx(0.15)  # the metrics of that step


def test_clock_leaves_out_paused_time_and_counts_input_waits(monkeypatch):
  now = [100.0]
  monkeypatch.setattr(train_loop.time, "perf_counter", lambda: now[0])
  clock = train_loop.StepClock()
  with clock.waiting():
    now[0] += 1.0
  now[0] += 3.0  # a step
  with clock.paused():  # evaluation, a checkpoint
    now[0] += 50.0
  assert clock.lap() == (4.0, 1.0)
  now[0] += 2.0
  assert clock.lap() == (2.0, 0.0)
