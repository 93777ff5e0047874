"""A real GCS emulator process on 127.0.0.1, for tests of gs:// paths.

`gcp-storage-emulator` (the `[gcp]` extra) serves the GCS JSON API in memory.
`start()` runs it on a free loopback port and waits until it answers; the
environment it returns (STORAGE_EMULATOR_HOST alone) is all a csctr process
needs: csctr.storage derives the gcsfs, tensorstore and credential settings
from it.
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import time
import urllib.request
from typing import Iterator

BUCKET = "csctr-test"


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


@contextlib.contextmanager
def running(bucket: str = BUCKET, timeout_s: float = 60.0) -> Iterator[str]:
  """Runs the emulator with `bucket` created; yields its http:// URL."""
  port = free_port()
  url = f"http://127.0.0.1:{port}"
  proc = subprocess.Popen(
      [sys.executable, "-m", "gcp_storage_emulator", "start",
       "--host=127.0.0.1", f"--port={port}", f"--default-bucket={bucket}",
       "--in-memory"],
      stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
  try:
    deadline = time.monotonic() + timeout_s
    while True:
      try:
        with urllib.request.urlopen(f"{url}/storage/v1/b/{bucket}",
                                    timeout=2) as r:
          if r.status == 200:
            break
      except OSError:
        pass
      if proc.poll() is not None:
        raise RuntimeError("gcp-storage-emulator exited: "
                           + proc.stderr.read().decode()[-2000:])
      if time.monotonic() > deadline:
        raise TimeoutError(f"gcp-storage-emulator did not answer on {url}")
      time.sleep(0.1)
    yield url
  finally:
    proc.terminate()
    try:
      proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
      proc.kill()
      proc.wait()
    proc.stderr.close()


def environ(url: str) -> dict[str, str]:
  """os.environ plus the one variable that points csctr at the emulator."""
  return {**os.environ, "STORAGE_EMULATOR_HOST": url}
