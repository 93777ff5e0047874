"""A small HTTP/1.1 server on asyncio + httptools: what the scorer needs, lean.

Chosen by measurement (docs/serving.md, "Choosing the HTTP stack"): on this
project's 2-core machine a bare asyncio.Protocol around the httptools parser
(the parser uvicorn uses) spent about half the CPU per small JSON request of
uvicorn running a bare ASGI app, and a quarter of FastAPI's. At 1,000
requests/s that difference is a tenth of a core, which the scorer and the
load generator need.

What it does: keep-alive, pipelined requests answered in order, bodies
bounded before they are read (413), headers bounded (431), unparseable
requests answered 400 and the connection closed, `Expect: 100-continue`.
What it leaves out: TLS, HTTP/2, chunked responses; put a proxy or load
balancer in front for TLS (docs/serving.md).
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import http
from typing import Awaitable, Callable

from absl import logging
import httptools

MAX_HEADER_BYTES = 64 * 1024
MAX_PIPELINED = 32  # requests queued on one connection before reads pause


@dataclasses.dataclass
class Request:
  method: str
  path: str
  headers: dict[str, str]  # lower-case names
  body: bytes


@dataclasses.dataclass
class Response:
  status: int
  body: bytes = b""
  content_type: str = "application/json"
  headers: tuple[tuple[str, str], ...] = ()


Handler = Callable[[Request], Awaitable[Response]]


def _encode(response: Response, keep_alive: bool) -> bytes:
  reason = http.HTTPStatus(response.status).phrase
  head = [f"HTTP/1.1 {response.status} {reason}",
          f"Content-Type: {response.content_type}",
          f"Content-Length: {len(response.body)}"]
  head += [f"{k}: {v}" for k, v in response.headers]
  if not keep_alive:
    head.append("Connection: close")
  return ("\r\n".join(head) + "\r\n\r\n").encode("latin-1") + response.body


def error_body(status: int, message: str) -> bytes:
  import json  # pylint: disable=g-import-not-at-top
  return json.dumps({"error": {"code": status, "message": message}}).encode()


class _Connection(asyncio.Protocol):
  """One client connection: parse, dispatch, answer in request order."""

  def __init__(self, handler: Handler, max_body: int):
    self._handler, self._max_body = handler, max_body
    self._transport: asyncio.Transport | None = None
    self._parser = httptools.HttpRequestParser(self)
    self._pending: collections.deque = collections.deque()  # (task, alive)
    self._paused = False
    self._reset()

  def _reset(self) -> None:
    self._url, self._headers, self._body = [], {}, []
    self._size = self._header_bytes = 0
    self._rejected: Response | None = None

  # ------------------------------------------------------------ transport

  def connection_made(self, transport: asyncio.BaseTransport) -> None:
    self._transport = transport  # type: ignore[assignment]

  def connection_lost(self, exc: Exception | None) -> None:
    for task, _ in self._pending:
      task.cancel()
    self._pending.clear()
    self._transport = None

  def data_received(self, data: bytes) -> None:
    try:
      self._parser.feed_data(data)
    except httptools.HttpParserUpgrade:
      self._fail(Response(400, error_body(400, "protocol upgrades are not "
                                          "supported")))
    except httptools.HttpParserError as e:
      if self._rejected is None:
        self._rejected = Response(400, error_body(
            400, f"malformed HTTP request: {e}"))
      self._fail(self._rejected)

  def _fail(self, response: Response) -> None:
    """Answers once the requests before it are answered, then closes."""
    loop = asyncio.get_running_loop()
    future = loop.create_future()
    future.set_result(response)
    self._pending.append((future, False))
    self._flush()
    if self._transport is not None:
      self._transport.pause_reading()

  # ------------------------------------------------------------ parser

  def on_message_begin(self) -> None:
    self._reset()

  def on_url(self, url: bytes) -> None:
    self._url.append(url)
    self._count_header(len(url))

  def on_header(self, name: bytes, value: bytes) -> None:
    self._count_header(len(name) + len(value))
    self._headers[name.decode("latin-1").lower()] = value.decode("latin-1")

  def _count_header(self, n: int) -> None:
    self._header_bytes += n
    if self._header_bytes > MAX_HEADER_BYTES and self._rejected is None:
      self._rejected = Response(431, error_body(
          431, f"request line and headers exceed {MAX_HEADER_BYTES} bytes"))
      raise httptools.HttpParserError("headers too large")

  def on_headers_complete(self) -> None:
    length = self._headers.get("content-length")
    if length is not None and length.isdigit() and int(length) > self._max_body:
      self._rejected = Response(413, error_body(
          413, f"body: {length} bytes > the limit of {self._max_body} "
          "(--max_body_bytes)"))
      raise httptools.HttpParserError("body too large")
    if self._headers.get("expect", "").lower() == "100-continue":
      self._transport.write(b"HTTP/1.1 100 Continue\r\n\r\n")

  def on_body(self, body: bytes) -> None:
    self._size += len(body)
    if self._size > self._max_body:  # chunked bodies carry no length
      self._rejected = Response(413, error_body(
          413, f"body: more than the limit of {self._max_body} bytes "
          "(--max_body_bytes)"))
      raise httptools.HttpParserError("body too large")
    self._body.append(body)

  def on_message_complete(self) -> None:
    url = httptools.parse_url(b"".join(self._url))
    request = Request(self._parser.get_method().decode("latin-1"),
                      url.path.decode("latin-1"), self._headers,
                      b"".join(self._body))
    alive = self._parser.should_keep_alive()
    task = asyncio.ensure_future(self._handle(request))
    self._pending.append((task, alive))
    task.add_done_callback(lambda _: self._flush())
    if len(self._pending) >= MAX_PIPELINED and not self._paused:
      self._paused = True
      self._transport.pause_reading()

  async def _handle(self, request: Request) -> Response:
    try:
      return await self._handler(request)
    except Exception as e:  # pylint: disable=broad-except
      logging.exception("handler failed on %s %s", request.method,
                        request.path)
      return Response(500, error_body(500, f"internal error: "
                                      f"{type(e).__name__}"))

  def _flush(self) -> None:
    """Writes the finished responses at the head of the queue, in order."""
    while self._pending and self._pending[0][0].done():
      future, alive = self._pending.popleft()
      if self._transport is None:
        return
      if future.cancelled():
        alive, response = False, Response(503, error_body(503, "cancelled"))
      else:
        response = future.result()
      self._transport.write(_encode(response, alive))
      if not alive:
        self._transport.close()
        self._transport = None
        return
    if self._paused and len(self._pending) < MAX_PIPELINED // 2:
      self._paused = False
      self._transport.resume_reading()


async def start_server(handler: Handler, host: str, port: int,
                       max_body: int) -> asyncio.AbstractServer:
  """Listens on host:port (port 0: any free port; see .sockets)."""
  loop = asyncio.get_running_loop()
  return await loop.create_server(lambda: _Connection(handler, max_body),
                                  host, port, reuse_address=True, backlog=1024)
