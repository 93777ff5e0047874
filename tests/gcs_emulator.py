"""A real GCS emulator process on 127.0.0.1, for tests of gs:// paths.

`gcp-storage-emulator` (installed by `[test]`) serves the GCS JSON API in
memory.
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
import tempfile
import time
import urllib.request
from typing import Iterator

BUCKET = "csctr-test"

# Real GCS answers an object download with its generation in
# x-goog-generation, which tensorstore (Orbax's OCDBT checkpoints) reads to
# validate what it cached; gcp-storage-emulator leaves the header out, and
# tensorstore then fails with "Malformed StorageGeneration". The emulator
# runs with that one header added, before its route table is built.
_MAIN = r"""
import sys
from gcp_storage_emulator.handlers import objects

_download = objects.download


def download(request, response, storage, *args, **kwargs):
  try:
    obj = storage.get_file_obj(request.params["bucket_name"],
                               request.params["object_id"])
    response["x-goog-generation"] = str(obj["generation"])
    response["x-goog-metageneration"] = str(obj.get("metageneration", 1))
  except Exception:  # the handler itself answers 404
    pass
  return _download(request, response, storage, *args, **kwargs)


objects.download = download
from gcp_storage_emulator.__main__ import main  # builds the routes now
main(sys.argv[1:])
"""


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


@contextlib.contextmanager
def running(bucket: str = BUCKET, timeout_s: float = 60.0) -> Iterator[str]:
  """Runs the emulator with `bucket` created; yields its http:// URL."""
  port = free_port()
  url = f"http://127.0.0.1:{port}"
  # It logs every request: to a file, since an undrained pipe would fill up
  # and stall the emulator.
  log = tempfile.TemporaryFile()
  proc = subprocess.Popen(
      [sys.executable, "-c", _MAIN, "start",
       "--host=127.0.0.1", f"--port={port}", f"--default-bucket={bucket}",
       "--in-memory"],
      stdout=log, stderr=subprocess.STDOUT)
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
        log.seek(0)
        raise RuntimeError("gcp-storage-emulator exited: "
                           + log.read().decode()[-2000:])
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
    log.close()


def environ(url: str) -> dict[str, str]:
  """os.environ plus the one variable that points csctr at the emulator."""
  return {**os.environ, "STORAGE_EMULATOR_HOST": url}
