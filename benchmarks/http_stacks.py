r"""CPU per request of candidate HTTP stacks for the scorer service.

  python benchmarks/http_stacks.py [--seconds=4] [--connections=8]

How csctr/serving/http.py was chosen (docs/serving.md, "Choosing the HTTP
stack"). Each server runs in its own process and answers POST /v1/score by
parsing the body (a 3.3 KB JSON request of 200 candidate ids) with orjson
and returning a small JSON; each client drives it over loopback with
--connections keep-alive connections in a closed loop for --seconds. Reports
requests/s and the CPU time per request of the server process (from /proc)
and of the client: CPU per request, unlike requests/s, is not set by what
else runs on a shared machine. Needs fastapi, starlette, uvicorn, aiohttp and
httpx (pip install), which the service itself does not.
"""

import asyncio
import json
import os
import socket
import subprocess
import sys
import time

from absl import app
from absl import flags

_SECONDS = flags.DEFINE_float("seconds", 4.0, "Duration per pair.")
_CONNECTIONS = flags.DEFINE_integer("connections", 8, "Concurrent requests.")
_SERVERS = flags.DEFINE_list(
    "servers", ["httptools", "asgi", "starlette", "fastapi", "aiohttp"],
    "Servers to measure.")
_CLIENTS = flags.DEFINE_list("clients", ["raw", "aiohttp", "httpx"],
                             "Clients to measure.")

BODY = json.dumps({"user": {"user_id": "u17"}, "candidates": {
    "item_id": [f"item{i}" for i in range(200)],
    "category_id": [f"c{i % 10}" for i in range(200)],
    "position": [i % 5 for i in range(200)]}}).encode()


def _work(body: bytes) -> bytes:
  import orjson  # pylint: disable=g-import-not-at-top
  ids = orjson.loads(body)["candidates"]["item_id"]
  return orjson.dumps({"scores": [0.5] * len(ids), "model_version": "x"})


def serve(kind: str, port: int) -> None:
  """Runs one candidate server (in its own process) until killed."""
  if kind == "httptools":
    _serve_httptools(port)
  elif kind == "aiohttp":
    _serve_aiohttp(port)
  else:
    import uvicorn  # pylint: disable=g-import-not-at-top
    uvicorn.run(_asgi_application(kind), host="127.0.0.1", port=port,
                log_level="warning", loop="uvloop", http="httptools",
                access_log=False)


def _serve_httptools(port: int) -> None:
  """csctr's own server (csctr/serving/http.py) on uvloop."""
  import uvloop  # pylint: disable=g-import-not-at-top
  from csctr.serving import http  # pylint: disable=g-import-not-at-top

  async def handler(request):
    return http.Response(200, _work(request.body))

  async def main():
    await http.start_server(handler, "127.0.0.1", port, 1 << 20)
    await asyncio.Event().wait()

  uvloop.run(main())


def _serve_aiohttp(port: int) -> None:
  import uvloop  # pylint: disable=g-import-not-at-top
  from aiohttp import web  # pylint: disable=g-import-not-at-top

  async def score(request):
    return web.Response(body=_work(await request.read()),
                        content_type="application/json")

  application = web.Application()
  application.router.add_post("/v1/score", score)
  uvloop.install()
  web.run_app(application, host="127.0.0.1", port=port, access_log=None,
              print=None)


def _asgi_application(kind: str):
  """The ASGI app uvicorn serves: bare ASGI, Starlette or FastAPI."""
  if kind == "asgi":

    async def application(scope, receive, send):
      body, more = b"", True
      while more:
        message = await receive()
        body += message.get("body", b"")
        more = message.get("more_body", False)
      out = _work(body)
      await send({"type": "http.response.start", "status": 200, "headers": [
          (b"content-type", b"application/json"),
          (b"content-length", str(len(out)).encode())]})
      await send({"type": "http.response.body", "body": out})
    return application
  if kind == "starlette":
    from starlette.applications import Starlette  # pylint: disable=g-import-not-at-top
    from starlette.responses import Response  # pylint: disable=g-import-not-at-top
    from starlette.routing import Route  # pylint: disable=g-import-not-at-top

    async def score(request):
      return Response(_work(await request.body()),
                      media_type="application/json")

    return Starlette(routes=[Route("/v1/score", score, methods=["POST"])])
  import fastapi  # pylint: disable=g-import-not-at-top
  application = fastapi.FastAPI()

  @application.post("/v1/score")
  async def score(request: fastapi.Request):  # pylint: disable=unused-variable
    return fastapi.responses.Response(_work(await request.body()),
                                      media_type="application/json")
  return application


def _cpu(pid: int) -> float:
  with open(f"/proc/{pid}/stat") as f:
    fields = f.read().rsplit(")", 1)[1].split()
  return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def _post_fn(kind: str, port: int):
  """An async post() for one client library, and its closer."""
  url = f"http://127.0.0.1:{port}/v1/score"
  headers = {"Content-Type": "application/json"}
  if kind == "aiohttp":
    import aiohttp  # pylint: disable=g-import-not-at-top
    session = aiohttp.ClientSession()

    async def post():
      async with session.post(url, data=BODY, headers=headers) as r:
        await r.read()
        assert r.status == 200
    return post, session.close
  if kind == "httpx":
    import httpx  # pylint: disable=g-import-not-at-top
    client = httpx.AsyncClient()

    async def post():
      r = await client.post(url, content=BODY, headers=headers)
      assert r.status_code == 200
    return post, client.aclose
  pool = []  # raw: hand-written HTTP/1.1 over asyncio streams
  request = (f"POST /v1/score HTTP/1.1\r\nHost: x\r\nContent-Type: "
             f"application/json\r\nContent-Length: {len(BODY)}\r\n\r\n"
             ).encode() + BODY

  async def post():
    reader, writer = pool.pop() if pool else await asyncio.open_connection(
        "127.0.0.1", port)
    writer.write(request)
    head = await reader.readuntil(b"\r\n\r\n")
    length = [h for h in head.lower().split(b"\r\n")
              if h.startswith(b"content-length")][0].split(b":")[1]
    await reader.readexactly(int(length))
    pool.append((reader, writer))

  async def close():
    for _, writer in pool:
      writer.close()
  return post, close


async def _measure(client: str, port: int, pid: int) -> dict[str, float]:
  post, close = await _post_fn(client, port)
  for _ in range(50):
    await post()
  done, stop = 0, False

  async def worker():
    nonlocal done
    while not stop:
      await post()
      done += 1

  server0, client0, t0 = _cpu(pid), time.process_time(), time.perf_counter()
  workers = [asyncio.create_task(worker())
             for _ in range(_CONNECTIONS.value)]
  await asyncio.sleep(_SECONDS.value)
  stop = True
  await asyncio.gather(*workers)
  elapsed = time.perf_counter() - t0
  result = {"rps": round(done / elapsed),
            "server_us": round(1e6 * (_cpu(pid) - server0) / done),
            "client_us": round(1e6 * (time.process_time() - client0) / done)}
  await close()
  return result


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _wait_for(port: int, timeout_s: float = 120.0) -> None:
  deadline = time.monotonic() + timeout_s
  while True:
    try:
      socket.create_connection(("127.0.0.1", port), 1).close()
      return
    except OSError:
      if time.monotonic() > deadline:
        raise
      time.sleep(0.2)


def main(argv):
  if len(argv) == 3 and argv[1].startswith("serve="):  # a server process
    serve(argv[1][len("serve="):], int(argv[2]))
    return
  import uvloop  # pylint: disable=g-import-not-at-top
  results = []
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  for kind in _SERVERS.value:
    port = _free_port()
    proc = subprocess.Popen([sys.executable, __file__, f"serve={kind}",
                             str(port)],
                            env={**os.environ, "PYTHONPATH": root})
    try:
      _wait_for(port)
      for client in _CLIENTS.value:
        r = uvloop.run(_measure(client, port, proc.pid))
        results.append({"server": kind, "client": client, **r})
        print(f"{kind:10s} {client:8s} {r['rps']:6d} req/s  server "
              f"{r['server_us']:5d} us/req  client {r['client_us']:5d} us/req",
              file=sys.stderr)
    finally:
      proc.kill()
      proc.wait()
  print(json.dumps({"results": results, "load_avg_1min": os.getloadavg()[0],
                    "connections": _CONNECTIONS.value}))


if __name__ == "__main__":
  app.run(main)
