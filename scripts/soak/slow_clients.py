"""Slow clients for scripts/soak.sh: half send their request head a byte a second
(cut off by `limits.header_timeout`), half send a small body a byte a second (answered
once the body is complete). Each reconnects when its connection ends. Runs for the
given seconds, then prints one summary line.

    python3 slow_clients.py HOST PORT CLIENTS SECONDS
"""
import select
import socket
import sys
import threading
import time

host, port, clients, seconds = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
end = time.monotonic() + seconds
counts = {"heads_cut": 0, "bodies_ok": 0, "bodies_failed": 0}
lock = threading.Lock()


def bump(k):
    with lock:
        counts[k] += 1


def repeat(session, on_error):
    """Runs `session` on one connection after another until the end."""
    while time.monotonic() < end:
        try:
            with socket.create_connection((host, port), timeout=30) as s:
                session(s)
        except OSError:
            bump(on_error)
            time.sleep(0.5)


def slow_head(s):
    head = b"GET / HTTP/1.1\r\nHost: soak\r\nX-Slow: " + b"a" * 10000
    for b in head:
        if time.monotonic() >= end:
            return
        s.sendall(bytes([b]))
        time.sleep(1)


def slow_body(s):
    body = b"x" * 20
    s.sendall(b"POST / HTTP/1.1\r\nHost: soak\r\nConnection: close\r\nContent-Length: %d\r\n\r\n" % len(body))
    for b in body:
        # An upstream may answer before the body is complete (nginx's `return`
        # does): then the answer is read and the rest not sent.
        if select.select([s], [], [], 0)[0]:
            break
        s.sendall(bytes([b]))
        time.sleep(1)
    got = b""
    while chunk := s.recv(4096):
        got += chunk
    bump("bodies_ok" if got.startswith(b"HTTP/1.1 200") else "bodies_failed")


threads = [
    threading.Thread(
        target=repeat,
        args=(slow_head, "heads_cut") if i % 2 == 0 else (slow_body, "bodies_failed"),
        daemon=True,
    )
    for i in range(clients)
]
for t in threads:
    t.start()
while time.monotonic() < end:
    time.sleep(1)
print("slow_clients " + " ".join(f"{k}={v}" for k, v in counts.items()), flush=True)
