"""csctr.progress: rate and ETA on a controlled clock, and the stderr line."""

import io

from csctr import progress


class Clock:

  def __init__(self):
    self.now = 100.0

  def __call__(self):
    return self.now


def test_meter_rate_and_eta_per_window():
  clock = Clock()
  meter = progress.Meter(total=100, done=10, clock=clock)
  clock.now += 4
  assert meter.rate(30) == 5.0  # 20 units in 4 s
  assert meter.eta(30) == 14.0  # 70 left at 5/s
  meter.restart(30)  # e.g. after an eval: its time is not the loop's
  clock.now += 100
  clock.now += 2
  assert meter.elapsed() == 102.0
  meter.restart(30)
  clock.now += 2
  assert meter.rate(50) == 10.0 and meter.eta(50) == 5.0


def test_progress_line_throttles_and_ends_with_a_newline():
  clock, out = Clock(), io.StringIO()
  line = progress.ProgressLine("export", "images", 40, stream=out, clock=clock)
  clock.now += 0.1
  line.update(10)  # within the interval: nothing written
  assert out.getvalue() == ""
  clock.now += 0.9
  line.update(20)
  assert out.getvalue() == "\rexport: 20/40 images (50%) 20 images/s ETA 1s "
  clock.now += 0.1
  line.update(40)  # the last update is always written
  assert out.getvalue().endswith("40/40 images (100%) 36 images/s ETA 0s \n")
  quiet = progress.ProgressLine("x", "y", 1, enabled=False, stream=out)
  quiet.update(1)
  assert out.getvalue().count("\n") == 1
