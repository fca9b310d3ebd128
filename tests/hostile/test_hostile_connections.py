"""Connections that never finish their request, over raw sockets on 127.0.0.1: held at most
--read-timeout (then 408 and closed), at most --max-connections at once (more get 503 at once),
while the server keeps answering others. Before, 1,000 such connections were held forever."""

from __future__ import annotations

import socket
import time

import httpx

TIMEOUT_S = 2.0
MAX_CONNECTIONS = 64


def connect(port: int, data: bytes) -> socket.socket:
    s = socket.create_connection(("127.0.0.1", port), timeout=30)
    if data:
        s.sendall(data)
    return s


def read_all(s: socket.socket, timeout: float) -> bytes:
    """What the server sends until it closes the connection (b"" if it sends nothing)."""
    s.settimeout(timeout)
    out = b""
    try:
        while chunk := s.recv(65536):
            out += chunk
    except (socket.timeout, ConnectionResetError):
        pass
    return out


PARTIAL = [b"", b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n",  # headers never finished
           b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\ncontent-type: application/json\r\n"
           b"content-length: 1000\r\n\r\n{\"messages\": ["]  # a body never finished


def test_unfinished_requests_are_closed_after_the_read_timeout(served):
    assert served.args[served.args.index("--read-timeout") + 1] == str(int(TIMEOUT_S))
    socks = [connect(served.port, PARTIAL[i % 3]) for i in range(30)]
    t0 = time.monotonic()
    assert served.alive()  # others are served meanwhile
    replies = [read_all(s, 3 * TIMEOUT_S + 10) for s in socks]
    took = time.monotonic() - t0
    for s in socks:
        s.close()
    assert all(r.startswith(b"HTTP/1.1 408 ") and b"--read-timeout" in r for r in replies), replies[:3]
    assert took < 3 * TIMEOUT_S + 5, took
    assert served.alive()


def test_open_connections_are_bounded(served):
    """Past --max-connections, a connection is answered 503 and closed at once; the held ones go
    at the read timeout, and then the server answers again."""
    held = [connect(served.port, PARTIAL[1]) for _ in range(MAX_CONNECTIONS)]
    time.sleep(0.3)  # accepted by the server's loop
    extra = [connect(served.port, PARTIAL[1]) for _ in range(200)]
    refused = [read_all(s, 5) for s in extra]
    for s in extra:
        s.close()
    assert sum(r.startswith(b"HTTP/1.1 503 ") and b"too_many_connections" in r for r in refused) >= 190, refused[:3]
    for s in held:
        assert read_all(s, 3 * TIMEOUT_S + 10).startswith(b"HTTP/1.1 408 ")
        s.close()
    assert served.alive()


def test_the_deadline_covers_receiving_a_request_not_answering_it(served):
    """A streamed answer read slowly, for longer than the read timeout, arrives whole; the kept-alive
    connection then serves a second request."""
    body = {"messages": [{"role": "user", "content": "Tell me a long story."}], "max_tokens": 200,
            "temperature": 0, "stream": True}
    with httpx.Client(timeout=120) as client:
        with client.stream("POST", f"{served.url}/v1/chat/completions", json=body) as r:
            assert r.status_code == 200
            lines = r.iter_lines()
            first = next(lines)
            time.sleep(TIMEOUT_S + 0.5)
            rest = [line for line in lines if line]
        assert first.startswith("data: ") and rest[-1] == "data: [DONE]"
        r = client.post(f"{served.url}/v1/chat/completions", json={**body, "stream": False})
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] > 0


def test_1000_idle_connections_do_not_starve_the_server(served):
    socks = []
    for _ in range(1000):
        try:
            socks.append(connect(served.port, b""))
        except OSError:  # the listen backlog is full: the kernel makes the client wait
            break
    try:
        t0 = time.monotonic()
        while time.monotonic() - t0 < 30:  # the held ones go at the read timeout, then it answers
            try:
                if httpx.get(f"{served.url}/health", timeout=5).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        else:
            raise AssertionError("the server stopped answering")
        assert len(_open_sockets(served.proc.pid)) <= MAX_CONNECTIONS + 10
    finally:
        for x in socks:
            x.close()
    assert served.alive()


def _open_sockets(pid: int) -> list:
    import psutil

    return [c for c in psutil.Process(pid).net_connections("tcp") if c.status == psutil.CONN_ESTABLISHED]
