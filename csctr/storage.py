"""Paths are URLs: a local directory and an object store (gs://...) alike.

Every path a user gives (workdir, data_dir, byod_path, export output, table
directory, encoder_init) goes through this module, so a run on a Cloud TPU VM
can keep everything in a bucket. Local paths use the os module; URLs use
etils.epath (fsspec: gcsfs for gs://), Orbax and tensorstore write
checkpoints, and tensorboardX writes gs:// event files with
google-cloud-storage. The cloud clients are the `[gcp]` extra
(`pip install -e ".[gcp]"`).

Object stores have no atomic rename, so "a reader never sees a half-written
thing" is kept with two rules:

- a small file (JSON, the eval log) is written whole: one object upload,
  which GCS makes visible at once (readers see the old or the new object);
  local files are written to a sibling and renamed;
- a directory (a prepared dataset, an embedding table) is complete iff its
  commit marker exists, and the marker is written last (`upload_dir`).
  Readers check the marker (`is_committed`, `wait_for`), and files that need
  a local path (ArrayRecord's reader and np.load's memmap open local files
  only) read a local mirror made by `local_mirror`, itself committed by a
  rename. Checkpoints use Orbax's own protocol (on gs://, a step is complete
  iff its commit_success.txt exists).

Emulators: with STORAGE_EMULATOR_HOST=http://HOST:PORT set (and nothing
else), `configure()` points gcsfs, google-cloud-storage and tensorstore at it
with anonymous credentials, and keeps the credential lookups on the machine.
It runs when this module is imported.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from typing import Any, Iterator

from etils import epath

EMULATOR_ENV = "STORAGE_EMULATOR_HOST"
CACHE_ENV = "CSCTR_REMOTE_CACHE"


def configure() -> None:
  """Points every GCS client at $STORAGE_EMULATOR_HOST, when it is set.

  google-cloud-storage reads the variable itself. gcsfs reads it too but
  needs anonymous credentials and its non-hierarchical code path
  (GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT=false); tensorstore (Orbax's array
  writer) needs TENSORSTORE_GCS_HTTP_URL. The metadata-server address is set
  to a closed loopback port so credential discovery fails fast here instead
  of looking for a cloud. The endpoint follows the variable on every call
  (a test may start a second emulator); other values the user set are kept.
  """
  host = os.environ.get(EMULATOR_ENV)
  if not host:
    return
  if "://" not in host:
    host = "http://" + host
  os.environ["TENSORSTORE_GCS_HTTP_URL"] = host
  os.environ.setdefault("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")
  os.environ.setdefault("GCE_METADATA_ROOT", "127.0.0.1:9")
  os.environ.setdefault("GCE_METADATA_HOST", "127.0.0.1:9")
  try:
    import fsspec  # pylint: disable=g-import-not-at-top
  except ImportError:
    return
  gcs = fsspec.config.conf.setdefault("gcs", {})
  gcs.setdefault("token", "anon")
  if gcs.get("endpoint_url") != host:
    gcs["endpoint_url"] = host
    # etils.epath keeps one fsspec filesystem per protocol (an lru_cache),
    # which would go on talking to the previous endpoint.
    from etils.epath import backend  # pylint: disable=g-import-not-at-top
    cached = getattr(backend._FileSystemSpecBackend, "_get_filesystem", None)  # pylint: disable=protected-access
    if hasattr(cached, "cache_clear"):
      cached.cache_clear()


configure()


def is_remote(path: str | os.PathLike[str]) -> bool:
  """True for URLs (gs://bucket/..., s3://...), False for local paths."""
  path = str(path)
  return "://" in path and not path.startswith("file://")


def as_path(path: str | os.PathLike[str]) -> epath.Path:
  """An epath.Path; local paths have ~ expanded."""
  path = str(path)
  return epath.Path(path if is_remote(path) else os.path.expanduser(path))


def join(base: str | os.PathLike[str], *parts: str) -> str:
  """os.path.join for local paths, '/'-joining for URLs."""
  base = str(base)
  if not is_remote(base):
    return os.path.join(os.path.expanduser(base), *parts)
  return "/".join([base.rstrip("/"), *(p.strip("/") for p in parts)])


def normalize(path: str | os.PathLike[str]) -> str:
  """An absolute local path, or the URL without a trailing slash."""
  path = str(path)
  if is_remote(path):
    return path.rstrip("/")
  return os.path.abspath(os.path.expanduser(path))


def exists(path: str | os.PathLike[str]) -> bool:
  return as_path(path).exists()


def isdir(path: str | os.PathLike[str]) -> bool:
  return as_path(path).is_dir()


def makedirs(path: str | os.PathLike[str]) -> None:
  """mkdir -p; a no-op on object stores (they have no directories)."""
  if is_remote(path):
    return
  os.makedirs(os.path.expanduser(str(path)), exist_ok=True)


def listdir(path: str | os.PathLike[str]) -> list[str]:
  """Names in a directory; [] when it does not exist."""
  p = as_path(path)
  if not p.exists():
    return []
  return sorted(child.name for child in p.iterdir())


def stamp(path: str | os.PathLike[str]) -> list[Any]:
  """[size, mtime] of a file, [] if it is missing: a cheap change detector."""
  p = as_path(path)
  try:
    st = p.stat()
  except (OSError, FileNotFoundError):
    return []
  return [int(st.length), int(st.mtime)]


def read_bytes(path: str | os.PathLike[str]) -> bytes:
  return as_path(path).read_bytes()


def read_text(path: str | os.PathLike[str]) -> str:
  return as_path(path).read_text()


def read_json(path: str | os.PathLike[str]) -> Any:
  return json.loads(read_text(path))


def write_bytes(path: str | os.PathLike[str], data: bytes) -> None:
  """Writes a whole file so that readers see the old or the new content."""
  path = str(path)
  if is_remote(path):
    as_path(path).write_bytes(data)  # one upload: visible whole or not at all
    return
  path = os.path.expanduser(path)
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  tmp = f"{path}.tmp-{os.getpid()}"
  with open(tmp, "wb") as f:
    f.write(data)
  os.replace(tmp, path)


def write_text(path: str | os.PathLike[str], text: str) -> None:
  write_bytes(path, text.encode())


def write_json(path: str | os.PathLike[str], obj: Any) -> None:
  write_text(path, json.dumps(obj, indent=2, default=str))


def remove(path: str | os.PathLike[str]) -> None:
  """Deletes a file or a whole directory tree, if it exists."""
  p = as_path(path)
  if not p.exists():
    return
  if p.is_dir():
    p.rmtree()
  else:
    p.unlink()


def _walk(local_dir: str) -> Iterator[str]:
  """Relative paths of the files under local_dir, sorted."""
  for root, _, files in sorted(os.walk(local_dir)):
    for name in sorted(files):
      yield os.path.relpath(os.path.join(root, name), local_dir)


def _copy(src: epath.Path, dst: epath.Path) -> None:
  dst.parent.mkdir(parents=True, exist_ok=True)
  with src.open("rb") as fin, dst.open("wb") as fout:
    shutil.copyfileobj(fin, fout, 1 << 22)


def upload_dir(local_dir: str, url: str, commit_file: str) -> str:
  """Copies local_dir to url, `commit_file` last; returns url.

  Readers treat url as complete iff url/commit_file exists, so a copy cut
  short is never read. Two uploaders of the same content (two processes that
  prepared the same dataset) leave one complete copy.
  """
  if not os.path.isfile(os.path.join(local_dir, commit_file)):
    raise FileNotFoundError(f"{local_dir} has no {commit_file} to commit")
  rels = [r for r in _walk(local_dir) if r != commit_file] + [commit_file]
  for rel in rels:
    _copy(epath.Path(os.path.join(local_dir, rel)), as_path(join(url, rel)))
  return url


def _relative_files(url: str) -> list[str]:
  """Relative paths of the files under url (one listing per directory)."""
  out, todo = [], [as_path(url)]
  base = todo[0]
  while todo:
    for child in todo.pop().iterdir():
      if child.is_dir():
        todo.append(child)
      else:
        out.append(str(child.relative_to(base)))
  return sorted(out)


def is_committed(path: str, commit_file: str) -> bool:
  return exists(join(path, commit_file))


def wait_for(path: str, commit_file: str, timeout_s: float,
             poll_s: float = 2.0) -> None:
  """Blocks until path/commit_file exists (another process commits it)."""
  deadline = time.monotonic() + timeout_s
  while not is_committed(path, commit_file):
    if time.monotonic() > deadline:
      raise TimeoutError(f"{join(path, commit_file)} did not appear within "
                         f"{timeout_s:.0f}s: did the process writing {path} "
                         "fail?")
    time.sleep(poll_s)


def cache_root() -> str:
  """Where remote directories are mirrored: $CSCTR_REMOTE_CACHE or ~/.cache."""
  return os.environ.get(CACHE_ENV) or os.path.join(
      os.path.expanduser("~"), ".cache", "csctr", "remote")


def mirror_path(url: str, root: str | None = None) -> str:
  """Where local_mirror keeps its copy of `url` ($CSCTR_REMOTE_CACHE/...)."""
  if not is_remote(url):
    return url
  scheme, rest = normalize(url).split("://", 1)
  return os.path.join(root or cache_root(), scheme, rest)


def local_mirror(url: str, commit_file: str, root: str | None = None) -> str:
  """A local copy of the committed directory `url`; `url` itself if local.

  For readers that need local files (ArrayRecord, memmapped .npy). The copy
  is made once per machine: downloaded into a temporary sibling and renamed
  into place, so concurrent processes on one host share one complete copy.
  A copy is reused while its commit file equals the remote one (one small
  read): a directory committed again at the same URL (a table exported with
  --overwrite) is downloaded again, never served stale.
  """
  if not is_remote(url):
    return url
  url = normalize(url)
  local = mirror_path(url, root)
  if not is_committed(url, commit_file):
    raise FileNotFoundError(f"{url} is not committed (no {commit_file})")
  marker = os.path.join(local, commit_file)
  if os.path.isfile(marker):
    with open(marker, "rb") as f:
      if f.read() == read_bytes(join(url, commit_file)):
        return local
    stale = tempfile.mkdtemp(prefix=f".stale-{os.path.basename(local)}-",
                             dir=os.path.dirname(local))
    try:
      os.rename(local, os.path.join(stale, "copy"))
    except OSError:
      pass  # another process on this host moved it first
    shutil.rmtree(stale, ignore_errors=True)
  os.makedirs(os.path.dirname(local), exist_ok=True)
  tmp = tempfile.mkdtemp(prefix=f".tmp-{os.path.basename(local)}-",
                         dir=os.path.dirname(local))
  try:
    rels = [r for r in _relative_files(url) if r != commit_file]
    for rel in [*rels, commit_file]:
      _copy(as_path(join(url, rel)), epath.Path(os.path.join(tmp, rel)))
    os.chmod(tmp, 0o755)
    try:
      os.rename(tmp, local)
    except OSError:  # another process on this host finished first
      if not os.path.isfile(os.path.join(local, commit_file)):
        raise
      shutil.rmtree(tmp, ignore_errors=True)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
  return local
