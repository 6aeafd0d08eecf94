"""The sockmap relay experiment's proxy (issue 15): accepts, connects to a backend, puts
both sockets in the SOCKHASH the verdict program (relay.bpf.c) redirects through, moves
what was queued before that by hand, and then never touches the connection again
("blind": the best case for a kernel-only relay, since l4lb would at least have to learn
of FIN and RST). Run by run.sh; usage: proxy.py LISTEN_PORT BACKEND_PORT [BACKEND_PORT...]"""
import asyncio
import ctypes
import os
import socket
import struct
import sys

libc = ctypes.CDLL(None, use_errno=True)
# bpf(2)'s number: x86_64 and aarch64 only.
SYS_BPF = {"x86_64": 321, "aarch64": 280}[os.uname().machine]
BPF_MAP_UPDATE_ELEM, BPF_OBJ_GET = 2, 7
SO_COOKIE = 57


def obj_get(path):
    p = ctypes.create_string_buffer(path.encode())
    buf = ctypes.create_string_buffer(struct.pack("QII", ctypes.addressof(p), 0, 0), 128)
    fd = libc.syscall(SYS_BPF, BPF_OBJ_GET, buf, 128)
    if fd < 0:
        raise OSError(ctypes.get_errno(), f"BPF_OBJ_GET {path}")
    return fd


def update(map_fd, key, value):
    k = ctypes.create_string_buffer(key, len(key))
    v = ctypes.create_string_buffer(value, len(value))
    attr = struct.pack("IIQQQ", map_fd, 0, ctypes.addressof(k), ctypes.addressof(v), 0)
    buf = ctypes.create_string_buffer(attr, 128)
    if libc.syscall(SYS_BPF, BPF_MAP_UPDATE_ELEM, buf, 128) < 0:
        raise OSError(ctypes.get_errno(), "BPF_MAP_UPDATE_ELEM")


PINS = os.environ["SOCKMAP_PINS"]
SOCKETS = obj_get(f"{PINS}/sockets")
LINKS = obj_get(f"{PINS}/links")
BACKENDS = [int(p) for p in sys.argv[2:]]
held = []
count = 0


def cookie(s):
    return struct.unpack("Q", s.getsockopt(socket.SOL_SOCKET, SO_COOKIE, 8))[0]


async def handle(client):
    global count
    loop = asyncio.get_running_loop()
    backend = socket.socket()
    backend.setblocking(False)
    backend.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    count += 1
    await loop.sock_connect(backend, ("127.0.0.1", BACKENDS[count % len(BACKENDS)]))
    c, b = cookie(client), cookie(backend)
    try:
        update(LINKS, struct.pack("Q", c), struct.pack("QQ", b, 0))
        update(LINKS, struct.pack("Q", b), struct.pack("QQ", c, 0))
        # The backend first: a client segment redirected to a backend not yet in the map
        # would be dropped (the backend sends nothing before the client's request).
        update(SOCKETS, struct.pack("Q", b), struct.pack("Q", backend.fileno()))
        update(SOCKETS, struct.pack("Q", c), struct.pack("Q", client.fileno()))
    except OSError:
        # EOPNOTSUPP: a socket no longer established (the client already left); E2BIG:
        # the maps are full (65,536 entries; the experiment runs far fewer).
        client.close()
        backend.close()
        return
    # Bytes queued before the sockets joined the map are not seen by the verdict program.
    for src, dst in ((client, backend), (backend, client)):
        while True:
            try:
                data = src.recv(65536, socket.MSG_DONTWAIT)
            except BlockingIOError:
                break
            if not data:
                break
            dst.sendall(data)
    held.append((client, backend))  # closed when the experiment ends


async def main():
    listener = socket.socket()
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind(("127.0.0.1", int(sys.argv[1])))
    listener.listen(4096)
    listener.setblocking(False)
    loop = asyncio.get_running_loop()
    while True:
        client, _ = await loop.sock_accept(listener)
        client.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        asyncio.ensure_future(handle(client))


asyncio.run(main())
