r"""`python -m csctr.serve --workdir=DIR`: the scorer as an HTTP service.

  python -m csctr.serve --workdir=/tmp/csctr_default [--table=DIR]
      [--host=127.0.0.1] [--port=8080] [--auth_token_file=FILE]

Serves the run's latest checkpoint with its newest embedding table (or
--table: one table, or a directory of tables), and swaps in newer ones as
they appear (--watch_interval_s) or on POST /v1/reload. Prints one JSON line
{"listening": "http://HOST:PORT", ...} once it accepts requests. The server
is csctr/serving/server.py; the API is in docs/serving.md.
"""

import os

from absl import app
from absl import flags

_WORKDIR = flags.DEFINE_string("workdir", None, "Training run directory.")
_TABLE = flags.DEFINE_string(
    "table", None, "An embedding table, or a directory of tables (the "
    "newest one of the served checkpoint is used); default "
    "WORKDIR/embedding_tables.")
_HOST = flags.DEFINE_string("host", "127.0.0.1", "Address to bind; 0.0.0.0 "
                            "exposes the service to the network.")
_PORT = flags.DEFINE_integer("port", 8080, "Port (0: any free port).")
_TOKEN_FILE = flags.DEFINE_string(
    "auth_token_file", None, "A file holding a bearer token that /v1/score "
    "and /v1/reload then require (or set CSCTR_SERVE_TOKEN).")
_MAX_CANDIDATES = flags.DEFINE_integer("max_candidates", 1024,
                                       "Candidates per request, at most.")
_MAX_BODY = flags.DEFINE_integer("max_body_bytes", 8 << 20,
                                 "Request body size, at most.")
_BATCH_CANDIDATES = flags.DEFINE_integer(
    "batch_candidates", 2048, "Candidates merged into one call (the largest "
    "compiled bucket).")
_BATCH_WAIT = flags.DEFINE_float(
    "batch_wait_ms", 0.5, "How long a batch that is not full waits for more "
    "requests.")
_WATCH = flags.DEFINE_float("watch_interval_s", 5.0, "Seconds between looks "
                            "for a newer checkpoint or table (0: off).")
_FALLBACK = flags.DEFINE_enum("fallback", "cnn", ("cnn", "category_mean"),
                              "For candidates missing from the table.")
_ALLOW_OTHER = flags.DEFINE_bool(
    "allow_other_checkpoint", False, "Serve a table of another checkpoint "
    "of the same model (stale embeddings).")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  # Before JAX starts: inline dispatch, single-threaded kernels (latency).
  from csctr.serving import cpu  # pylint: disable=g-import-not-at-top
  from csctr.serving import server  # pylint: disable=g-import-not-at-top
  cpu.configure_cpu_serving()
  token = os.environ.get("CSCTR_SERVE_TOKEN")
  if _TOKEN_FILE.value:
    with open(_TOKEN_FILE.value) as f:
      token = f.read().strip()
  server.run(_WORKDIR.value, _HOST.value, _PORT.value, server.ServerConfig(
      table=_TABLE.value, max_candidates=_MAX_CANDIDATES.value,
      max_body_bytes=_MAX_BODY.value,
      batch_candidates=_BATCH_CANDIDATES.value,
      batch_wait_ms=_BATCH_WAIT.value, watch_interval_s=_WATCH.value,
      auth_token=token or None, fallback=_FALLBACK.value,
      allow_other_checkpoint=_ALLOW_OTHER.value))


if __name__ == "__main__":
  flags.mark_flags_as_required(["workdir"])
  app.run(main)
