#!/usr/bin/env python3
"""permessage-deflate's cost and gain: bytes on the wire and server CPU per delivery.

One room of ``--members`` receivers and one sender, seed-sized chat messages (a
frame of about 250 bytes: the seed's fields, a sentence of about 80 characters,
the server's id and received_at) sent at ``--rate`` messages a second for
``--duration`` seconds after a second of warm-up. Each variant starts its own
trio-chat (embedded default, limits for people lifted), pinned to the first CPU;
the load generator is one process on the others (a plain epoll loop that counts
frames and bytes and inflates nothing):

- ``plain``: no client offers permessage-deflate;
- ``deflate``: every client offers it as browsers do
  (``permessage-deflate; client_max_window_bits``), the sender compresses what
  it sends, the server compresses each broadcast once;
- ``before``: ``plain`` against the tree of another commit (``--before REV``,
  default ``main``, exported with ``git archive`` and put first on the server's
  ``PYTHONPATH``), to see that the fan-out without deflate is not slower.

Reported per variant: bytes per delivery (WebSocket frames as received, headers
included; TCP/IP headers not counted), server CPU per delivery (utime + stime of
the server process over the measured window, over the deliveries received in
it), how many clients negotiated deflate, and lost deliveries (every receiver
must have every message within 10 s of the last send). ``--repeat`` runs the
variants that many times, interleaved, and prints every run and the medians.

``--frames`` instead times :func:`trio_chat.deflate.deflate_frame` alone on the
server's common frames (a typing event, an ack, a chat_enter, a short and a
seed-sized message) with the size threshold off: size before and after, and the
time of one compression, which is what :data:`trio_chat.deflate.MIN_DEFLATE`
is chosen from.

Usage::

    .venv/bin/python scripts/bench_deflate.py --frames

    .venv/bin/python scripts/bench_deflate.py --quick
    flock /tmp/bench.lock .venv/bin/python scripts/bench_deflate.py --members 200 --rate 250
    flock /tmp/bench.lock .venv/bin/python scripts/bench_deflate.py --members 1000 --rate 50
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import select
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import zlib
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from bench import HOST, ROOT
from bench.procstat import read_stat
from bench.servers import split_cpus, start_server

from tests.wire import client_frame, handshake_request

OFFER = "Sec-WebSocket-Extensions: permessage-deflate; client_max_window_bits\r\n"
WORDS = ("the", "meeting", "moved", "to", "three", "o'clock", "and", "everyone", "should",
         "bring", "their", "notes", "about", "launch", "plans", "tomorrow", "morning",
         "thanks", "great", "idea", "lunch", "after", "review", "please", "check")
ROOM = 4242
SENDER_AUTHOR = 11


def sentence(i: int) -> str:
    """About 80 characters of chat, different for every message."""
    words, n = [], i * 7919
    while sum(len(w) + 1 for w in words) < 75:
        words.append(WORDS[n % len(WORDS)])
        n = n // 3 + i + len(words) * 13
    return f"#{i} " + " ".join(words)


def upgrade(port: int, path: str, offer: bool) -> tuple[socket.socket, bytes, bool]:
    sock = socket.create_connection((HOST, port))
    sock.sendall(handshake_request(path, extra=OFFER if offer else ""))
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            raise RuntimeError("the server closed the connection during the upgrade")
        data += chunk
    head, _, rest = data.partition(b"\r\n\r\n")
    if not head.startswith(b"HTTP/1.1 101"):
        raise RuntimeError(head.decode("latin-1"))
    return sock, rest, b"permessage-deflate" in head.lower()


def count_frames(buf: bytearray) -> int:
    """Drop the whole frames at the start of ``buf``; how many there were."""
    pos, n, end = 0, 0, len(buf)
    while end - pos >= 2:
        length, head = buf[pos + 1] & 0x7F, 2
        if length == 126:
            if end - pos < 4:
                break
            length, head = int.from_bytes(buf[pos + 2:pos + 4], "big"), 4
        elif length == 127:
            if end - pos < 10:
                break
            length, head = int.from_bytes(buf[pos + 2:pos + 10], "big"), 10
        if end - pos < head + length:
            break
        pos += head + length
        n += 1
    del buf[:pos]
    return n


def deflated(payload: bytes) -> bytes:
    """A masked client frame with its payload compressed (RSV1), as a browser sends it."""
    c = zlib.compressobj(6, zlib.DEFLATED, -15)
    frame = bytearray(client_frame((c.compress(payload) + c.flush(zlib.Z_SYNC_FLUSH))[:-4]))
    frame[0] |= 0x40
    return bytes(frame)


def load(port: int, server_pid: int, args: dict[str, Any], offer: bool,
         cpus: set[int] | None, out: Any) -> None:
    """The load generator (a process of its own): receivers, the sender, the tally."""
    if cpus:
        os.sched_setaffinity(0, cpus)
    members, rate, duration = args["members"], args["rate"], args["duration"]
    socks, bufs, agreed = {}, {}, 0
    for _ in range(members):
        sock, rest, ok = upgrade(port, f"/ws/{ROOM}", offer)
        sock.setblocking(False)
        socks[sock.fileno()] = sock
        bufs[sock.fileno()] = bytearray(rest)
        agreed += ok
    sender, _, ok = upgrade(port, f"/ws/{ROOM}?author_id={SENDER_AUTHOR}", offer)
    agreed += ok
    sender.setblocking(False)
    poll = select.epoll()
    for fd in socks:
        poll.register(fd, select.EPOLLIN)
    frames = dict.fromkeys(socks, 0)
    received_bytes = 0
    warm = 1.0
    total = int(rate * (warm + duration))
    start = time.monotonic()
    sent = 0
    t0 = t1 = 0.0
    cpu0 = cpu1 = 0.0
    frames0 = bytes0 = frames1 = bytes1 = 0
    done_at = None
    while True:
        now = time.monotonic()
        if not t0 and now - start >= warm:
            t0, cpu0 = now, read_stat(server_pid).cpu_s
            frames0, bytes0 = sum(frames.values()), received_bytes
        due = min(total, int((now - start) * rate) + 1)
        while sent < due:
            payload = json.dumps({
                "message_type": "chat_txt", "author_id": SENDER_AUTHOR, "room_id": ROOM,
                "content": sentence(sent),
                "create_at": datetime.now(timezone.utc).isoformat(timespec="milliseconds")
                .replace("+00:00", "Z")}).encode()
            data = deflated(payload) if offer else client_frame(payload)
            sender.setblocking(True)
            sender.sendall(data)
            sender.setblocking(False)
            sent += 1
        try:
            while sender.recv(65536):  # acks and its own copies, unread otherwise
                pass
        except BlockingIOError:
            pass
        if sent == total and done_at is None:
            # The measured window ends with the last send.
            done_at = t1 = now
            cpu1 = read_stat(server_pid).cpu_s
            frames1, bytes1 = sum(frames.values()), received_bytes
        # The sender's chat_enter reaches every receiver too: one more frame each.
        if done_at is not None and (min(frames.values()) >= total + 1 or now - done_at > 10):
            break
        for fd, _ in poll.poll(0.002):
            try:
                chunk = socks[fd].recv(262144)
            except BlockingIOError:
                continue
            if not chunk:
                raise RuntimeError("the server closed a receiver")
            received_bytes += len(chunk)
            buf = bufs[fd]
            buf += chunk
            frames[fd] += count_frames(buf)
    lost = sum(max(0, total + 1 - n) for n in frames.values())
    for sock in [*socks.values(), sender]:
        sock.close()
    deliveries = frames1 - frames0
    out.send({"deliveries": deliveries, "bytes_per_delivery": (bytes1 - bytes0) / deliveries,
              "cpu_us_per_delivery": (cpu1 - cpu0) / deliveries * 1e6,
              "deliveries_per_s": deliveries / (t1 - t0), "agreed": agreed,
              "clients": members + 1, "lost": lost, "sent": total})


FRAMES = {
    "typing": {"message_type": "typing", "author_id": 11, "room_id": 123,
               "create_at": "2022-06-05T12:00:00.004Z"},
    "ack": {"message_type": "ack", "client_msg_id": "6f1c2a", "id": 17, "room_id": 123,
            "received_at": "2022-06-05T12:00:00.004Z", "durable": True},
    "chat_enter": {"message_type": "chat_enter", "author_id": 11, "room_id": 123,
                   "content": "", "create_at": "2022-06-05T12:00:00.004Z", "online": 3},
    "short message": {"id": 17, "message_type": "chat_txt", "author_id": 11, "room_id": 123,
                      "content": "ok", "create_at": "2022-06-05T12:00:00.000Z",
                      "received_at": "2022-06-05T12:00:00.004Z"},
    "seed message": {"id": 17, "message_type": "chat_txt", "author_id": 11, "room_id": 123,
                     "content": sentence(12), "create_at": "2022-06-05T12:00:00.000Z",
                     "received_at": "2022-06-05T12:00:00.004Z"},
}


def frame_table() -> None:
    import timeit

    from trio_chat import deflate
    from trio_chat.framing import utf8_frame

    deflate.MIN_DEFLATE = 0
    print("| frame | payload bytes | frame bytes | compressed | µs per compression |")
    print("| --- | --- | --- | --- | --- |")
    for name, obj in FRAMES.items():
        payload = json.dumps(obj, separators=(",", ":")).encode()
        frame = utf8_frame(payload)
        out = deflate.deflate_frame(frame)
        seconds = min(timeit.repeat(lambda f=frame: deflate.deflate_frame(f), number=2000,
                                    repeat=5)) / 2000
        print(f"| {name} | {len(payload)} | {len(frame)} | {len(out)} | {seconds * 1e6:.1f} |")


def export_tree(rev: str, workdir: Path) -> Path:
    tree = workdir / f"tree-{rev.replace('/', '_')}"
    tree.mkdir()
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", rev], check=True,
                             capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(tree)], input=archive, check=True)
    return tree


def run_variant(name: str, args: argparse.Namespace, workdir: Path,
                before_tree: Path | None) -> dict[str, Any]:
    split = split_cpus(not args.no_pin)
    server_cpus, load_cpus = split if split else (None, None)
    env_before = os.environ.get("PYTHONPATH")
    if name == "before":
        assert before_tree is not None
        os.environ["PYTHONPATH"] = str(before_tree)
    try:
        server = start_server("trio-chat", workdir, server_cpus)
    finally:
        if env_before is None:
            os.environ.pop("PYTHONPATH", None)
        else:
            os.environ["PYTHONPATH"] = env_before
    try:
        assert server.proc is not None
        sock, _, agreed = upgrade(server.port, "/ws/1", offer=True)
        sock.close()
        if agreed != (name != "before"):
            raise RuntimeError(f"{name}: the server under test is not the intended tree")
        receive, send = multiprocessing.Pipe(duplex=False)
        process = multiprocessing.Process(target=load, args=(
            server.port, server.proc.pid, vars(args), name == "deflate", load_cpus, send))
        process.start()
        process.join(args.duration + 120)
        if process.is_alive():
            process.kill()
            raise RuntimeError("the load generator did not finish")
        if process.exitcode != 0:
            raise RuntimeError(f"the load generator failed ({process.exitcode})")
        return {"variant": name, **receive.recv()}
    finally:
        server.stop()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--members", type=int, default=200)
    parser.add_argument("--rate", type=float, default=250.0, help="messages per second")
    parser.add_argument("--duration", type=float, default=10.0)
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--variants", default="before,plain,deflate")
    parser.add_argument("--before", default="main", help="the commit 'before' runs")
    parser.add_argument("--no-pin", action="store_true")
    parser.add_argument("--quick", action="store_true", help="50 members, 3 s, once")
    parser.add_argument("--frames", action="store_true",
                        help="time the compression of single frames, nothing else")
    args = parser.parse_args()
    if args.frames:
        frame_table()
        return 0
    if args.quick:
        args.members, args.rate, args.duration, args.repeat = 50, 100.0, 3.0, 1
    variants = args.variants.split(",")
    runs: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="bench-deflate-") as tmp:
        workdir = Path(tmp)
        tree = export_tree(args.before, workdir) if "before" in variants else None
        for _ in range(args.repeat):
            for name in variants:
                run = run_variant(name, args, workdir, tree)
                runs.append(run)
                print(f"{name:8} {args.members} members, {args.rate:g} msg/s: "
                      f"{run['deliveries_per_s']:,.0f} deliveries/s, "
                      f"{run['bytes_per_delivery']:.1f} B/delivery, "
                      f"{run['cpu_us_per_delivery']:.2f} µs CPU/delivery, "
                      f"deflate {run['agreed']}/{run['clients']}, lost {run['lost']}",
                      flush=True)
    print(f"\nmedians, {args.members} members, {args.rate:g} msg/s, "
          f"{args.duration:g} s x {args.repeat}:")
    print("| variant | bytes/delivery | server CPU µs/delivery | deliveries/s | lost |")
    print("| --- | --- | --- | --- | --- |")
    failed = False
    for name in variants:
        mine = [r for r in runs if r["variant"] == name]
        lost = sum(r["lost"] for r in mine)
        failed |= lost > 0
        print(f"| {name} | {statistics.median(r['bytes_per_delivery'] for r in mine):.1f} | "
              f"{statistics.median(r['cpu_us_per_delivery'] for r in mine):.2f} | "
              f"{statistics.median(r['deliveries_per_s'] for r in mine):,.0f} | {lost} |")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
