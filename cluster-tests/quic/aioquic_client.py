#!/usr/bin/env python3
"""An independent ringfeed QUIC client, written from docs/protocol.md ("QUIC") alone,
on aioquic: no ringfeed code. The cluster test cluster-tests/tests/cluster/aioquic.rs
runs it to check the node's framing against a second implementation.

    aioquic_client.py --addr HOST:PORT --key K --sha256 HEX[,HEX...] --count N [--timeout S]

It connects with ALPN ringfeed/1, pins the server's certificate by the SHA-256 of its
DER encoding (any of the comma-separated fingerprints: a redirect leads to another
node), opens one bidirectional stream and sends `hello`, follows up to 3 redirects,
sends a `ping` once welcomed and expects a `pong`. Every server frame is printed as one
JSON line on stdout, and `READY` after the welcome. It exits 0 once N updates (and the
pong) have arrived; on any error or timeout it exits 1 with a message on stderr.
"""

import argparse
import asyncio
import hashlib
import json
import ssl
import sys

from aioquic.asyncio import QuicConnectionProtocol, connect
from aioquic.quic.configuration import QuicConfiguration
from aioquic.quic.events import ConnectionTerminated, StreamDataReceived
from cryptography.hazmat.primitives.serialization import Encoding

ALPN = "ringfeed/1"
MAX_REDIRECTS = 3
# The application close code that follows a `redirect` frame.
MOVED = 4300


class Failure(Exception):
    """A protocol violation or an unexpected close: the client exits non-zero."""


class FramedProtocol(QuicConnectionProtocol):
    """Splits the stream's bytes into frames (u32 big-endian length, then JSON) and
    queues them; the connection's end is queued as its ConnectionTerminated event."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.stream_id = None
        self.buffer = b""
        self.inbox = asyncio.Queue()

    def send_frame(self, frame: dict) -> None:
        body = json.dumps(frame).encode()
        if self.stream_id is None:
            # The client opens the one bidirectional stream.
            self.stream_id = self._quic.get_next_available_stream_id()
        self._quic.send_stream_data(self.stream_id, len(body).to_bytes(4, "big") + body)
        self.transmit()

    def quic_event_received(self, event) -> None:
        if isinstance(event, StreamDataReceived):
            if event.stream_id != self.stream_id:
                self.inbox.put_nowait(Failure(f"data on stream {event.stream_id}"))
                return
            self.buffer += event.data
            while len(self.buffer) >= 4:
                length = int.from_bytes(self.buffer[:4], "big")
                if len(self.buffer) < 4 + length:
                    break  # the rest of this frame is still on its way
                body, self.buffer = self.buffer[4 : 4 + length], self.buffer[4 + length :]
                self.inbox.put_nowait(json.loads(body))
        elif isinstance(event, ConnectionTerminated):
            self.inbox.put_nowait(event)

    def peer_sha256(self) -> str:
        # aioquic keeps the verified-or-not leaf certificate on its TLS context.
        certificate = self._quic.tls._peer_certificate
        return hashlib.sha256(certificate.public_bytes(Encoding.DER)).hexdigest()


def emit(line: str) -> None:
    print(line, flush=True)


async def session(addr: str, args, pins: set) -> str | None:
    """One connection to `addr`: None once the updates have arrived, else the `quic`
    address of the node a redirect sends us to."""
    host, _, port = addr.rpartition(":")
    configuration = QuicConfiguration(
        is_client=True,
        alpn_protocols=[ALPN],
        # Self-signed certificates: no CA check, the fingerprint is checked below.
        verify_mode=ssl.CERT_NONE,
    )
    async with connect(
        host.strip("[]"),
        int(port),
        configuration=configuration,
        create_protocol=FramedProtocol,
    ) as conn:
        fingerprint = conn.peer_sha256()
        if fingerprint not in pins:
            raise Failure(f"{addr}: certificate SHA-256 {fingerprint} is not pinned")

        conn.send_frame({"type": "hello", "key": args.key})
        redirect, ponged, updates = None, False, 0
        while True:
            frame = await conn.inbox.get()
            if isinstance(frame, Failure):
                raise frame
            if isinstance(frame, ConnectionTerminated):
                # The one close we expect: 4300 right after a redirect frame.
                if redirect is not None and frame.error_code == MOVED:
                    return redirect
                raise Failure(
                    f"{addr}: connection closed, code {frame.error_code} "
                    f"({frame.reason_phrase!r}) after {updates} updates"
                )
            emit(json.dumps(frame))
            kind = frame.get("type")
            if kind == "welcome":
                emit("READY")
                conn.send_frame({"type": "ping"})
            elif kind == "pong":
                ponged = True
            elif kind == "redirect":
                redirect = frame["quic"]  # the close 4300 comes next
            elif kind == "update":
                updates += 1
            elif kind == "error":
                raise Failure(f"{addr}: error frame {frame}")
            if updates >= args.count and ponged:
                return None


async def run(args) -> None:
    pins = {pin.strip().lower() for pin in args.sha256.split(",") if pin.strip()}
    addr = args.addr
    for _ in range(MAX_REDIRECTS + 1):
        addr = await session(addr, args, pins)
        if addr is None:
            return
    raise Failure(f"more than {MAX_REDIRECTS} redirects")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--addr", required=True, help="HOST:PORT of a node's QUIC listener")
    parser.add_argument("--key", required=True)
    parser.add_argument("--sha256", required=True, help="pinned fingerprints, comma-separated")
    parser.add_argument("--count", type=int, required=True, help="updates to receive")
    parser.add_argument("--timeout", type=float, default=20.0, help="seconds, in all")
    args = parser.parse_args()
    try:
        asyncio.run(asyncio.wait_for(run(args), args.timeout))
    except asyncio.TimeoutError:
        print(f"aioquic_client: timed out after {args.timeout} s", file=sys.stderr)
        return 1
    except Exception as e:  # a Failure, a refused handshake, a bad frame…
        print(f"aioquic_client: {type(e).__name__}: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
