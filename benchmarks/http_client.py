"""A lean HTTP/1.1 load client: keep-alive connections, httptools parsing.

The load test (benchmarks/serving_load.py) shares the machine's cores with
the server it measures, so the client's own CPU per request decides how much
is left for the server. aiohttp spends ~0.7-1 ms of CPU per 200-candidate
request on this machine (its request/response objects, header handling,
per-request timeouts); this client sends pre-encoded requests over a pool of
keep-alive connections and parses responses with httptools (the parser the
server uses), a fraction of that. It is a real client all the same: real
sockets, HTTP/1.1 framing (Content-Length and chunked responses), status
codes checked by the caller, a connection closed and replaced after a
timeout or an error.
"""

from __future__ import annotations

import asyncio
import collections

import httptools


class _Connection(asyncio.Protocol):
  """One keep-alive connection; one request in flight at a time."""

  def __init__(self):
    self.transport: asyncio.Transport | None = None
    self.parser = httptools.HttpResponseParser(self)
    self.waiter: asyncio.Future | None = None
    self.body: list[bytes] = []
    self.lost = False

  def connection_made(self, transport):
    self.transport = transport

  def connection_lost(self, exc):
    self.lost = True
    if self.waiter is not None and not self.waiter.done():
      self.waiter.set_exception(ConnectionError(f"connection lost: {exc}"))

  def data_received(self, data: bytes):
    try:
      self.parser.feed_data(data)
    except httptools.HttpParserError as e:
      self.lost = True
      self.transport.close()
      if self.waiter is not None and not self.waiter.done():
        self.waiter.set_exception(ConnectionError(f"bad response: {e}"))

  def on_body(self, body: bytes):  # httptools callback
    self.body.append(body)

  def on_message_complete(self):  # httptools callback
    if self.waiter is not None and not self.waiter.done():
      self.waiter.set_result((self.parser.get_status_code(),
                              b"".join(self.body)))
    self.body = []


class Client:
  """POSTs pre-encoded bodies to one URL path over <= `connections` sockets.

  A request waits for a free connection (as aiohttp's connection limit
  does); `post` returns (status, body) or raises on a timeout or a broken
  connection, after which that connection is dropped.
  """

  def __init__(self, host: str, port: int, path: str, connections: int = 64,
               timeout_s: float = 2.0):
    self.host, self.port, self.timeout_s = host, port, timeout_s
    self._head = (f"POST {path} HTTP/1.1\r\nHost: {host}:{port}\r\n"
                  "Content-Type: application/json\r\nContent-Length: ")
    self._idle: collections.deque[_Connection] = collections.deque()
    self._slots = asyncio.Semaphore(connections)

  def encode(self, body: bytes) -> bytes:
    """The whole request for `body` (encode once, send many times)."""
    return f"{self._head}{len(body)}\r\n\r\n".encode() + body

  async def _connection(self) -> _Connection:
    while self._idle:
      conn = self._idle.pop()
      if not conn.lost:
        return conn
    loop = asyncio.get_running_loop()
    _, conn = await loop.create_connection(_Connection, self.host, self.port)
    return conn

  async def post(self, request: bytes) -> tuple[int, bytes]:
    """Sends one encoded request; (status code, response body)."""
    async with self._slots:
      conn = await self._connection()
      loop = asyncio.get_running_loop()
      conn.waiter = loop.create_future()
      conn.transport.write(request)
      timer = loop.call_later(self.timeout_s, _expire, conn.waiter)
      try:
        result = await conn.waiter
      except BaseException:
        conn.lost = True
        conn.transport.close()
        raise
      finally:
        timer.cancel()
        conn.waiter = None
      self._idle.append(conn)
      return result

  def close(self) -> None:
    while self._idle:
      self._idle.pop().transport.close()


def _expire(waiter: asyncio.Future) -> None:
  if not waiter.done():
    waiter.set_exception(asyncio.TimeoutError())
