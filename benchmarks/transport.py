"""The floors under an HTTP request's time: moving the body, and checking its CRC.

    python benchmarks/transport.py            # 400 MB body, 5 runs each
    python benchmarks/transport.py --mb 100

Prints medians of:
- a bare socket on loopback (`sendall` into `recv_into` a preallocated buffer):
  what no server can beat on this machine;
- a bare ASGI app under uvicorn that only collects the body (what the server
  stack costs before labelq's handler runs);
- zlib's CRC-32 of the body on one thread against `service.npz.crc32` in pieces.
It measures; it asserts nothing.
"""

from __future__ import annotations

import argparse
import http.client
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import zlib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from service import npz  # noqa: E402

BARE_APP = '''
async def app(scope, receive, send):
    if scope["type"] != "http":
        return
    chunks, more = [], True
    while more:
        m = await receive()
        chunks.append(m.get("body", b""))
        more = m.get("more_body", False)
    body = b"".join(chunks)
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/plain")]})
    await send({"type": "http.response.body", "body": str(len(body)).encode()})
'''


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _post(port: int, body: bytes) -> None:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=300)
    conn.request("POST", "/", body=memoryview(body))
    conn.getresponse().read()
    conn.close()


def _median(fn, runs: int) -> float:
    times = []
    for _ in range(runs):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def raw_socket(body: bytes, runs: int) -> float:
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen()
    port = srv.getsockname()[1]

    def serve() -> None:
        buf = bytearray(len(body) + (1 << 16))
        view = memoryview(buf)
        while True:
            conn, _ = srv.accept()
            got = 0
            while got < len(body):  # headers and body, roughly: enough to take it all in
                k = conn.recv_into(view[got:], min(1 << 22, len(buf) - got))
                if not k:
                    break
                got += k
            conn.sendall(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
            conn.close()

    threading.Thread(target=serve, daemon=True).start()
    return _median(lambda: _post(port, body), runs)


def bare_uvicorn(body: bytes, runs: int) -> float:
    port = _free_port()
    with tempfile.TemporaryDirectory() as tmp:
        Path(tmp, "bare_asgi.py").write_text(BARE_APP)
        proc = subprocess.Popen(
            [sys.executable, "-m", "uvicorn", "--app-dir", tmp, "bare_asgi:app", "--port", str(port),
             "--log-level", "warning"],
        )  # fmt: skip
        try:
            deadline = time.time() + 30
            while True:
                try:
                    socket.create_connection(("127.0.0.1", port), timeout=1).close()
                    break
                except OSError:
                    if time.time() > deadline:
                        raise
                    time.sleep(0.1)
            return _median(lambda: _post(port, body), runs)
        finally:
            proc.terminate()
            proc.wait(timeout=30)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mb", type=int, default=400)
    ap.add_argument("--runs", type=int, default=5)
    args = ap.parse_args()
    body = os.urandom(1 << 20) * args.mb
    view = memoryview(body)
    print(f"body {args.mb} MB, medians of {args.runs}")
    print(f"  bare socket on loopback      {raw_socket(body, args.runs) * 1e3:7.0f} ms")
    print(f"  bare ASGI app under uvicorn  {bare_uvicorn(body, args.runs) * 1e3:7.0f} ms")
    print(f"  CRC-32, zlib on one thread   {_median(lambda: zlib.crc32(view), args.runs) * 1e3:7.0f} ms")
    print(f"  CRC-32, npz.crc32 in pieces  {_median(lambda: npz.crc32(view), args.runs) * 1e3:7.0f} ms")


if __name__ == "__main__":
    main()
