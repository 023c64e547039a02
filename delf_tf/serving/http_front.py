"""A small HTTP/1.1 server for the dev server's REST API: asyncio I/O, bounded, timed, pooled.

Why not `http.server`: ThreadingHTTPServer gives each connection a thread that
blocks in reads without a timeout, so a few hundred stalled clients exhaust the
process (issue 12). Here one asyncio loop does all socket I/O, so an idle or
stalled connection costs a socket and a few kilobytes, never a thread; only a
complete request reaches the thread pool that runs the handler. (No HTTP
library is a dependency of the project; the REST API needs only request line,
headers, a Content-Length body, keep-alive and JSON answers.)

Limits, each answered with a JSON `{"error": ...}` and the connection closed:
- `max_connections` open connections: one more gets 503 at once;
- a request header must be complete (at most 64 KiB, 100 fields) within
  `idle_timeout` seconds of the connection's opening or previous answer:
  else the connection is closed (431 when too large);
- the body needs a Content-Length (411 without one; chunked Transfer-Encoding
  is refused with 411); a negative, non-numeric or conflicting length is 400;
  one over `max_body_bytes` is 413 (after reading and dropping up to 16 times
  that much for a while, so a client that sends before reading sees the answer);
- request bodies held in memory at once are bounded by `max_buffered_bytes`
  (503 beyond);
- the body must arrive, the handler finish and the answer be sent within
  `request_timeout` seconds of the end of the header (408 while reading, 504
  while the handler runs; a running handler is not interrupted, it finishes in
  its thread and its answer is dropped);
- `threads` handlers run at once; complete requests wait for a free one.

`stop(grace)` stops accepting connections, closes idle ones and those still
sending a request, lets requests whose handler runs finish (their answers are
sent with `Connection: close`) for up to `grace` seconds, then closes the rest.
"""

from __future__ import annotations

import asyncio
import http
import json
import socket
import threading
from collections.abc import Callable
from concurrent import futures

from absl import logging

from delf_tf.errors import ConfigError

MAX_HEADER_BYTES = 64 << 10
MAX_HEADER_FIELDS = 100
_LINGER_SECONDS = 2.0

# handler(method, target, headers {lower-case name: value}, body) -> (status, JSON bytes), or
# (status, bytes, content type) for answers that are not JSON (the search service's page).
Handler = Callable[[str, str, dict[str, str], bytes], tuple[int, bytes] | tuple[int, bytes, str]]
JSON_TYPE = "application/json"


class _Reject(Exception):
    """A request that is answered by the front end itself (and the connection closed)."""

    def __init__(self, status: int, message: str, drain: int = 0):
        super().__init__(message)
        self.status = status
        self.message = message
        self.drain = drain  # body bytes the client is expected to send anyway


def error_body(message: str) -> bytes:
    return json.dumps({"error": message}).encode("utf-8")


class HttpFrontEnd:
    """Serves `handler` on (host, port) from a background thread; see the module docstring."""

    def __init__(
        self,
        host: str,
        port: int,
        handler: Handler,
        *,
        max_body_bytes: int,
        threads: int = 8,
        max_connections: int = 512,
        idle_timeout: float = 30.0,
        request_timeout: float = 30.0,
        max_buffered_bytes: int | None = None,
        server_name: str = "delf-serve",
    ):
        if threads < 1 or max_connections < 1 or idle_timeout <= 0 or request_timeout <= 0:
            raise ConfigError(
                "threads and max_connections must be >= 1, the timeouts > 0: "
                f"{threads}, {max_connections}, {idle_timeout}, {request_timeout}"
            )
        self.handler = handler
        self.max_body_bytes = max_body_bytes
        self.max_connections = max_connections
        self.idle_timeout = idle_timeout
        self.request_timeout = request_timeout
        self.max_buffered_bytes = max_buffered_bytes or max(4 * max_body_bytes, 64 << 20)
        self.server_name = server_name
        self._pool = futures.ThreadPoolExecutor(max_workers=threads, thread_name_prefix="rest")
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self._socket = socket.create_server(
            (host, port), family=family, backlog=max(128, min(max_connections, 4096))
        )
        self.port = self._socket.getsockname()[1]
        self._loop = asyncio.new_event_loop()
        self._thread: threading.Thread | None = None
        self._server: asyncio.base_events.Server | None = None
        self._connections: dict[asyncio.Task, str] = {}  # task -> "idle" | "reading" | "busy"
        self._buffered = 0
        self._closing = False
        self._ready = threading.Event()

    # -- life cycle (called from other threads) --------------------------------------------

    def start(self) -> HttpFrontEnd:
        self._thread = threading.Thread(target=self._run, name="rest-io", daemon=True)
        self._thread.start()
        self._ready.wait()
        return self

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)

        async def begin():
            self._server = await asyncio.start_server(
                self._accept, sock=self._socket, limit=MAX_HEADER_BYTES
            )

        self._loop.run_until_complete(begin())
        self._ready.set()
        self._loop.run_forever()
        self._loop.run_until_complete(self._loop.shutdown_asyncgens())
        self._loop.close()

    def stop(self, grace: float = 10.0) -> None:
        """Graceful stop; returns when every connection is closed (after `grace` at most)."""
        if self._thread is None:
            return
        done = asyncio.run_coroutine_threadsafe(self._shutdown(grace), self._loop)
        try:
            done.result(timeout=grace + 10)
        except (futures.TimeoutError, RuntimeError):
            logging.warning("REST front end: shutdown did not finish cleanly")
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)
        self._thread = None
        self._pool.shutdown(wait=False, cancel_futures=True)

    async def _shutdown(self, grace: float) -> None:
        self._closing = True
        if self._server is not None:
            self._server.close()  # no new connections
        for task, state in list(self._connections.items()):
            if state != "busy":
                task.cancel()
        busy = [task for task in self._connections if not task.done()]
        if busy:
            _, pending = await asyncio.wait(busy, timeout=grace)
            for task in pending:
                task.cancel()
            if pending:
                logging.warning(
                    "REST: %d request(s) still running after the grace period", len(pending)
                )
                await asyncio.wait(pending, timeout=1.0)

    def busy_count(self) -> int:
        """Requests whose handler is running or waiting for a thread."""
        return sum(state == "busy" for state in list(self._connections.values()))

    # -- one connection --------------------------------------------------------------------

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        if self._closing or len(self._connections) >= self.max_connections:
            try:
                await self._answer(
                    writer, 503, error_body("the server is at its connection limit"), True
                )
                await self._linger(reader, writer, 0, seconds=0.2)
            except (ConnectionError, OSError):
                pass
            finally:
                writer.close()
            return
        self._connections[task] = "idle"
        try:
            await self._serve(reader, writer, task)
        except (asyncio.CancelledError, ConnectionError, OSError):
            pass
        except Exception:  # a bug here must not take the loop down
            logging.exception("REST connection failed")
        finally:
            self._connections.pop(task, None)
            writer.close()

    async def _serve(self, reader, writer, task) -> None:
        while not self._closing:
            self._connections[task] = "idle"
            try:
                head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), self.idle_timeout)
            except asyncio.IncompleteReadError as error:  # the client closed
                if error.partial.strip():
                    await self._answer(writer, 400, error_body("incomplete request header"), True)
                return
            except asyncio.LimitOverrunError:
                await self._reject(reader, writer, _Reject(431, "request header over 64 KiB"))
                return
            except (asyncio.TimeoutError, TimeoutError):
                return  # idle (or stalled in its header) for too long
            self._connections[task] = "reading"
            loop = asyncio.get_running_loop()
            deadline = loop.time() + self.request_timeout
            try:
                method, target, headers, length, keep_alive = self._parse(head)
            except _Reject as reject:
                await self._reject(reader, writer, reject)
                return
            if self._buffered + length > self.max_buffered_bytes:
                await self._reject(
                    reader, writer, _Reject(503, "the server holds too many request bodies", length)
                )
                return
            self._buffered += length
            try:
                if length and headers.get("expect", "").lower() == "100-continue":
                    writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
                try:
                    body = await asyncio.wait_for(
                        reader.readexactly(length), max(deadline - loop.time(), 0.001)
                    )
                except (asyncio.TimeoutError, TimeoutError):
                    await self._answer(
                        writer, 408, error_body("request body not received in time"), True
                    )
                    return
                except asyncio.IncompleteReadError:
                    return
                self._connections[task] = "busy"
                work = loop.run_in_executor(self._pool, self._call, method, target, headers, body)
                del body
                try:
                    status, payload, content_type = await asyncio.wait_for(
                        asyncio.shield(work), max(deadline - loop.time(), 0.001)
                    )
                except (asyncio.TimeoutError, TimeoutError):
                    work.cancel()  # not started yet: never runs; running: its answer is dropped
                    status, payload, content_type = (
                        504,
                        error_body(
                            f"no answer within the request timeout of {self.request_timeout:g} s"
                        ),
                        JSON_TYPE,
                    )
                    keep_alive = False
                except asyncio.CancelledError:  # shutdown past the grace period
                    work.cancel()
                    raise
            finally:
                self._buffered -= length
            close = not keep_alive or self._closing
            await self._answer(writer, status, payload, close, deadline, content_type)
            if close:
                return

    def _call(self, method, target, headers, body) -> tuple[int, bytes, str]:
        try:
            answer = self.handler(method, target, headers, body)
        except Exception as error:  # the handler answers its own errors; this is a bug
            logging.exception("REST handler failed")
            return 500, error_body(f"internal error: {type(error).__name__}: {error}"), JSON_TYPE
        return answer if len(answer) == 3 else (*answer, JSON_TYPE)

    def _parse(self, head: bytes):
        """(method, target, headers, body length, keep-alive) of a request header, or _Reject."""
        lines = head[:-4].decode("latin-1").split("\r\n")
        parts = lines[0].split(" ")
        if len(parts) != 3 or not parts[0].isalpha() or not parts[1]:
            raise _Reject(400, f"malformed request line {lines[0][:100]!r}")
        method, target, version = parts
        if not version.startswith("HTTP/"):
            raise _Reject(400, f"malformed request line {lines[0][:100]!r}")
        if version not in ("HTTP/1.1", "HTTP/1.0"):
            raise _Reject(505, f"HTTP version {version[:20]!r} is not supported")
        if len(lines) - 1 > MAX_HEADER_FIELDS:
            raise _Reject(431, f"more than {MAX_HEADER_FIELDS} header fields")
        headers: dict[str, str] = {}
        lengths: list[str] = []
        for line in lines[1:]:
            name, colon, value = line.partition(":")
            if not colon or not name or name != name.strip() or line[0] in " \t":
                raise _Reject(400, f"malformed header field {line[:100]!r}")
            name, value = name.lower(), value.strip()
            if name == "content-length":
                lengths.append(value)
            headers[name] = value
        if "transfer-encoding" in headers:
            raise _Reject(
                411, "Transfer-Encoding is not supported: send the body with a Content-Length"
            )
        if not lengths:
            if method in ("POST", "PUT", "PATCH"):
                raise _Reject(411, f"a {method} request needs a Content-Length header")
            length = 0
        else:
            if len(set(lengths)) != 1 or not lengths[0].isdigit() or not lengths[0].isascii():
                raise _Reject(400, f"invalid Content-Length {', '.join(lengths)[:60]!r}")
            if len(lengths[0]) > 15 or int(lengths[0]) > self.max_body_bytes:
                size = int(lengths[0])
                raise _Reject(
                    413,
                    f"request size {size} bytes is larger than the limit of "
                    f"{self.max_body_bytes} bytes",
                    drain=size,
                )
            length = int(lengths[0])
        connection = headers.get("connection", "").lower()
        keep_alive = "close" not in connection and (
            version == "HTTP/1.1" or "keep-alive" in connection
        )
        return method, target, headers, length, keep_alive

    async def _reject(self, reader, writer, reject: _Reject) -> None:
        await self._answer(writer, reject.status, error_body(reject.message), True)
        await self._linger(reader, writer, reject.drain)

    async def _linger(self, reader, writer, expected: int, seconds: float | None = None) -> None:
        """After a refusal: half-close, then read and drop what the client still sends (up to
        16 x max_body_bytes, for a few seconds), so it reads the answer instead of a reset."""
        try:
            if writer.can_write_eof():
                writer.write_eof()
            budget = min(max(expected, 1 << 20), 16 * self.max_body_bytes)
            timeout = seconds or (_LINGER_SECONDS if expected <= 0 else self.request_timeout)
            loop = asyncio.get_running_loop()
            end = loop.time() + timeout
            while budget > 0 and loop.time() < end:
                chunk = await asyncio.wait_for(reader.read(1 << 20), end - loop.time())
                if not chunk:
                    break
                budget -= len(chunk)
        except (asyncio.TimeoutError, TimeoutError, ConnectionError, OSError):
            pass

    async def _answer(
        self, writer, status: int, payload: bytes, close: bool, deadline=None, content_type=None
    ):
        try:
            reason = http.HTTPStatus(status).phrase
        except ValueError:
            reason = "Unknown"
        head = (
            f"HTTP/1.1 {status} {reason}\r\nServer: {self.server_name}\r\n"
            f"Content-Type: {content_type or JSON_TYPE}\r\nContent-Length: {len(payload)}\r\n"
            "X-Content-Type-Options: nosniff\r\n"
            + ("Connection: close\r\n" if close else "")
            + "\r\n"
        )
        writer.write(head.encode("latin-1") + payload)
        loop = asyncio.get_running_loop()
        timeout = self.request_timeout if deadline is None else max(deadline - loop.time(), 1.0)
        try:
            await asyncio.wait_for(writer.drain(), timeout)
        except (asyncio.TimeoutError, TimeoutError):
            writer.transport.abort()  # the client does not read its answer
            raise ConnectionError("answer not read in time") from None
