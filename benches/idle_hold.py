"""Holds N idle keep-alive connections to a proxy, for benches/idle_bench.sh.

Opens N connections to HOST:PORT, sends one `GET /ping` on each and reads its whole answer
(so each connection is an idle keep-alive connection, as after a real request), prints
`ready`, waits for a line on stdin, then closes them all and prints `closed`.
"""
import socket
import sys

host, port, n = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
req = f"GET /ping HTTP/1.1\r\nHost: {host}:{port}\r\n\r\n".encode()
conns = []
for i in range(n):
    s = socket.create_connection((host, port), timeout=10)
    s.sendall(req)
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = s.recv(4096)
        if not chunk:
            sys.exit(f"connection {i} closed before answering")
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    length = 0
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value)
    while len(body) < length:
        body += s.recv(4096)
    if not head.startswith(b"HTTP/1.1 200"):
        sys.exit(f"connection {i}: {head.splitlines()[0]!r}")
    conns.append(s)
print("ready", flush=True)
sys.stdin.readline()
for s in conns:
    s.close()
print("closed", flush=True)
