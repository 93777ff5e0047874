"""The scorer as an HTTP service: raw ids in, scores out, swapped in place.

    python -m csctr.serve --workdir=/tmp/csctr_default [--table=DIR]
        [--host=127.0.0.1] [--port=8080]

Routes (docs/serving.md has the full API):

    POST /v1/score    a request (csctr/serving/schema.py) -> {"scores",
                      "logits", "model_version", "table_version", "misses",
                      "fallbacks": {"cnn", "category_mean"}, ...}
    POST /v1/reload   look for a newer checkpoint or table now, swap it in
    GET  /healthz     200 and the versions being served
    GET  /metrics     Prometheus text format

A Version is everything that scores: the model's head at one checkpoint,
one embedding table and the dataset's vocabularies. Concurrent requests are
merged by csctr/serving/batcher.py into one jitted call of that version. A
new version (a newer checkpoint with its table, or a newer table of the
served checkpoint) is built beside the serving one, in a background thread
(restored, compiled, warmed up), then swapped in with one reference
assignment that the batcher reads once per batch: a request is scored by one
version, whole, and none waits for or fails because of a swap.
"""

from __future__ import annotations

import dataclasses
import gc
import hmac
import json
import os
import threading
import time
from typing import Any

from absl import logging
import numpy as np
import orjson

from csctr import rundir
from csctr.data import vocab as vocab_lib
from csctr.serving import export as export_lib
from csctr.serving import http
from csctr.serving import metrics as metrics_lib
from csctr.serving import schema
from csctr.serving import scorer as scorer_lib
from csctr.serving import table as table_lib
from csctr.serving.batcher import MicroBatcher
from csctr.serving import version as version_lib
from csctr.serving.version import Version


@dataclasses.dataclass(frozen=True)
class ServerConfig:
  """Service limits and behaviour (the flags of python -m csctr.serve)."""

  table: str | None = None  # a table dir, or a dir of tables to pick from
  max_candidates: int = 1024  # per request
  max_body_bytes: int = 8 << 20
  batch_candidates: int = 2048  # per merged batch = the largest bucket
  batch_requests: int = 64
  batch_wait_ms: float = 0.5
  watch_interval_s: float = 5.0  # 0: swap only on POST /v1/reload
  auth_token: str | None = None
  fallback: str = "cnn"
  allow_other_checkpoint: bool = False


class Service:
  """Versions, swaps, the batcher and the metrics of one serving process."""

  def __init__(self, workdir: str, config: ServerConfig = ServerConfig(),
               serving_config: scorer_lib.ServingConfig | None = None):
    self.workdir, self.config = workdir, config
    self.serving_config = serving_config or scorer_lib.ServingConfig(
        buckets=_buckets(config.batch_candidates), fallback=config.fallback,
        allow_other_checkpoint=config.allow_other_checkpoint,
        max_requests=config.batch_requests)
    self.metrics = _make_metrics()
    self._reload_lock = threading.Lock()
    self._model = None  # (step, model, run config, info, encoder hash)
    self._vocabs: dict[str, vocab_lib.Vocabulary] | None = None
    self.version: Version | None = None
    self.reload()
    if self.version is None:
      raise FileNotFoundError(
          f"no embedding table for step {self._model[0]} of {workdir} in "
          f"{self._table_root()}: run python -m csctr.export "
          f"--workdir={workdir}")
    info = self.version.scorer.info
    self.spec = schema.RequestSpec(
        info.sparse_features, info.num_dense, info.num_behaviors,
        info.image_size, max_candidates=config.max_candidates)
    self.batcher = MicroBatcher(lambda: self.version, config.batch_candidates,
                                config.batch_requests,
                                config.batch_wait_ms / 1e3, self._on_batch)
    self._stop = threading.Event()
    if config.watch_interval_s > 0:
      threading.Thread(target=self._watch, name="watcher", daemon=True).start()

  def _table_root(self) -> str:
    return self.config.table or os.path.join(self.workdir,
                                             export_lib.TABLES_DIR)

  # ------------------------------------------------------------ versions

  def reload(self) -> bool:
    """Builds and swaps in a newer version if there is one; True if swapped.

    Serialised (one build at a time); the serving version keeps serving
    while the next one is restored, compiled and warmed up.
    """
    with self._reload_lock:
      step = rundir.latest_committed_step(self.workdir)
      if step is None:
        raise FileNotFoundError(f"no committed checkpoint in {self.workdir}")
      if self._model is None or self._model[0] != step:
        model, run_config, info, step = rundir.restore_model(self.workdir,
                                                             step)
        enc = (export_lib.encoder_hash(model) if model.use_image else None)
        self._model = (step, model, run_config, info, enc)
      step, model, run_config, info, enc = self._model
      table = None
      if model.use_image:
        path = table_lib.pick_table(self._table_root(),
                          export_lib.config_hash(run_config.model, info),
                          None if self.config.allow_other_checkpoint else enc)
        if path is None:
          if self.version is not None:
            logging.info("step %d has no table in %s yet: still serving %s",
                         step, self._table_root(), self.version.key)
          return False
        table = export_lib.EmbeddingTable(path)
      key = version_lib.version_key(step, table)
      if self.version is not None and self.version.key == key:
        return False
      if self._vocabs is None:
        _, _, data_path = rundir.load_run_files(self.workdir)
        self._vocabs = vocab_lib.load_vocabularies(data_path)
      if self.version is not None and _schema(
          self.version.scorer.info) != _schema(info):
        raise ValueError(  # requests are checked against the first schema
            f"the checkpoint at step {step} takes other request fields "
            f"({_schema(info)}) than the served one: restart the server")
      start = time.perf_counter()
      scorer = scorer_lib.Scorer(model, run_config.model, info, table,
                                 self.serving_config, step)
      version = Version(scorer, self._vocabs, "item_id", key)
      old, self.version = self.version, version  # the swap
      self.metrics.replace("csctr_version_info", 1,
                           model_version=version.model_version,
                           table_version=version.table_version)
      if old is not None:
        self.metrics.inc("csctr_swaps_total")
      logging.info("serving model %s table %s (built in %.1fs)",
                   version.model_version, version.table_version,
                   time.perf_counter() - start)
      return True

  def _watch(self) -> None:
    while not self._stop.wait(self.config.watch_interval_s):
      try:
        self.reload()
      except Exception:  # pylint: disable=broad-except
        self.metrics.inc("csctr_reload_errors_total")
        logging.exception("reload failed; still serving the old version")

  def close(self) -> None:
    self._stop.set()
    self.batcher.stop()

  # ------------------------------------------------------------ HTTP

  def _on_batch(self, requests: int, candidates: int, seconds: float) -> None:
    m = self.metrics
    m.observe("csctr_batch_requests", requests)
    m.observe("csctr_batch_candidates", candidates)
    m.observe("csctr_batch_seconds", seconds)

  def _authorized(self, request: http.Request) -> bool:
    token = self.config.auth_token
    if not token:
      return True
    given = request.headers.get("authorization", "")
    return hmac.compare_digest(given.encode(), f"Bearer {token}".encode())

  async def handle(self, request: http.Request) -> http.Response:
    """Routes one request; a BadRequest becomes its 4xx, never a 500."""
    start = time.perf_counter()
    route = (request.method, request.path)
    try:
      response = await self._route(request, route)
    except schema.BadRequest as e:
      response = _json(e.status, {"error": {"code": e.status,
                                            "message": str(e)}})
    path = request.path if route in _ROUTES else "other"
    self.metrics.inc("csctr_http_requests_total", path=path,
                     code=str(response.status))
    if route == ("POST", "/v1/score"):
      self.metrics.observe("csctr_request_seconds",
                           time.perf_counter() - start)
    return response

  async def _route(self, request: http.Request, route) -> http.Response:
    if route not in _ROUTES:
      allowed = [m for m, p in _ROUTES if p == request.path]
      if allowed:
        raise schema.BadRequest(405, f"method: {request.method} "
                                f"{request.path} takes {allowed}")
      raise schema.BadRequest(404, f"path: no route {request.path!r} "
                              f"(routes: {sorted({p for _, p in _ROUTES})})")
    if route == ("GET", "/healthz"):
      return _json(200, {"status": "ok", **self._versions()})
    if route == ("GET", "/metrics"):
      return http.Response(200, self.metrics.render(),
                           metrics_lib.CONTENT_TYPE)
    if not self._authorized(request):
      return http.Response(401, http.error_body(
          401, "authorization: missing or wrong bearer token"),
                           headers=(("WWW-Authenticate", "Bearer"),))
    if route == ("POST", "/v1/reload"):
      import asyncio  # pylint: disable=g-import-not-at-top
      swapped = await asyncio.get_running_loop().run_in_executor(
          None, self.reload)
      return _json(200, {"swapped": swapped, **self._versions()})
    return await self._score(request)

  def _versions(self) -> dict[str, str]:
    v = self.version
    return {"model_version": v.model_version,
            "table_version": v.table_version}

  async def _score(self, request: http.Request) -> http.Response:
    parsed = schema.parse(request.body, self.spec)
    result, version = await self.batcher.submit(parsed)
    m = self.metrics
    m.inc("csctr_candidates_total", parsed.n)
    m.inc("csctr_misses_total", result.misses)
    m.inc("csctr_fallbacks_total", result.cnn_fallbacks, kind="cnn")
    m.inc("csctr_fallbacks_total", result.mean_fallbacks,
          kind="category_mean")
    m.inc("csctr_behavior_misses_total", result.behavior_misses)
    logits = np.ascontiguousarray(result.logits, np.float32)
    # orjson writes float32 arrays itself (shortest round-trip digits).
    return http.Response(200, orjson.dumps({
        "scores": 1 / (1 + np.exp(-logits)),
        "logits": logits,
        "model_version": version.model_version,
        "table_version": version.table_version,
        "misses": result.misses,
        "fallbacks": {"cnn": result.cnn_fallbacks,
                      "category_mean": result.mean_fallbacks},
        "behavior_misses": result.behavior_misses},
        option=orjson.OPT_SERIALIZE_NUMPY))


_ROUTES = frozenset({("POST", "/v1/score"), ("POST", "/v1/reload"),
                     ("GET", "/healthz"), ("GET", "/metrics")})


def _schema(info: Any) -> tuple[Any, ...]:
  return (info.sparse_features, info.num_dense, info.num_behaviors,
          info.image_size)


def _json(status: int, obj: Any) -> http.Response:
  return http.Response(status, orjson.dumps(obj))


def _buckets(largest: int) -> tuple[int, ...]:
  """16, 64, 256, then doubling, up to `largest`, which is always the last.

  Merged batches are large: doubling above 256 bounds padding to half.
  """
  out, b = [], 16
  while b < largest:
    out.append(b)
    b = b * 4 if b < 256 else b * 2
  return (*out, largest)


def _make_metrics() -> metrics_lib.Registry:
  m = metrics_lib.Registry()
  m.counter("csctr_http_requests_total", "HTTP requests by path and code.")
  m.histogram("csctr_request_seconds", "Latency of /v1/score in the server "
              "(parse to response).",
              (.0005, .001, .002, .005, .01, .02, .05, .1, .25, 1))
  m.histogram("csctr_batch_requests", "Requests per merged batch.",
              (1, 2, 4, 8, 16, 32, 64))
  m.histogram("csctr_batch_candidates", "Candidates per merged batch.",
              (16, 64, 256, 512, 1024, 2048, 4096))
  m.histogram("csctr_batch_seconds", "Scoring time of a merged batch.",
              (.0002, .0005, .001, .002, .005, .01, .02, .05))
  m.counter("csctr_candidates_total", "Candidates scored.")
  m.counter("csctr_misses_total", "Candidates whose item is not in the "
            "table.")
  m.counter("csctr_fallbacks_total", "Misses by fallback (cnn: embedded on "
            "the fly from request pixels; category_mean).")
  m.counter("csctr_behavior_misses_total", "Behaviour items not in the table "
            "(masked).")
  m.counter("csctr_swaps_total", "Versions swapped in after the first.")
  m.counter("csctr_reload_errors_total", "Failed background reloads.")
  m.gauge("csctr_version_info", "The version being served (labels).")
  return m


def run(workdir: str, host: str = "127.0.0.1", port: int = 8080,
        config: ServerConfig = ServerConfig()) -> None:
  """Loads the newest version, listens, serves until SIGINT/SIGTERM.

  Prints one JSON line {"listening": "http://HOST:PORT", ...} on stdout once
  requests are accepted (port 0 picks a free port: read it there).
  """
  import asyncio  # pylint: disable=g-import-not-at-top
  import signal  # pylint: disable=g-import-not-at-top
  service = Service(workdir, config)
  # The restored model, JAX and the table are hundreds of thousands of
  # long-lived objects; freezing them keeps them out of every later GC
  # pass, whose pauses otherwise land in the latency tail.
  gc.collect()
  gc.freeze()

  async def main():
    server = await http.start_server(service.handle, host, port,
                                     config.max_body_bytes)
    bound = server.sockets[0].getsockname()
    print(json.dumps({"listening": f"http://{bound[0]}:{bound[1]}",
                      **service._versions()}), flush=True)  # pylint: disable=protected-access
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
      loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    server.close()
    await server.wait_closed()

  try:
    import uvloop  # pylint: disable=g-import-not-at-top
  except ImportError:  # optional (not on Windows): asyncio's own loop
    uvloop = None
  try:
    (uvloop.run if uvloop else asyncio.run)(main())
  finally:
    service.close()


def spawn(workdir: str, *flags: str, stderr: Any = None,
          timeout_s: float = 300.0) -> tuple[Any, str]:
  """Starts `python -m csctr.serve` in a subprocess; (Popen, base URL).

  For tests, benchmarks and scripts that run replicas: returns once the
  server accepts requests (it binds a free port unless flags say --port).
  """
  import subprocess  # pylint: disable=g-import-not-at-top
  import sys  # pylint: disable=g-import-not-at-top
  root = os.path.dirname(os.path.dirname(os.path.dirname(
      os.path.abspath(__file__))))
  env = {**os.environ, "PYTHONPATH": os.pathsep.join(
      [root, os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)}
  port = [] if any(f.startswith("--port") for f in flags) else ["--port=0"]
  proc = subprocess.Popen(
      [sys.executable, "-m", "csctr.serve", f"--workdir={workdir}", *port,
       *flags], stdout=subprocess.PIPE, stderr=stderr, text=True, env=env,
      cwd=root)
  ready = threading.Event()
  line: list[str] = []

  def read():
    line.append(proc.stdout.readline())
    ready.set()

  threading.Thread(target=read, daemon=True).start()
  if not ready.wait(timeout_s) or not line[0]:
    proc.kill()
    raise RuntimeError(f"csctr.serve did not start (exit {proc.wait()})")
  return proc, json.loads(line[0])["listening"]
