#!/usr/bin/env python3
"""Open N keep-alive HTTPS connections, one GET each, then hold them idle.

Usage: idle_conns.py HOST PORT CAFILE N [PARALLEL]

Every connection does a full TLS handshake (SNI = HOST, ALPN http/1.1, the
certificate verified against CAFILE), sends one `GET /` with keep-alive, reads
the whole response and then stays open without sending anything. Opening is
PARALLEL connections at a time (default 100) so no listen backlog overflows.

Prints `ready OPEN FAILED SECONDS` on stdout once all attempts are done, then
idles (sends nothing) until it is killed.
"""

import asyncio
import resource
import ssl
import sys
import time


async def open_one(host, port, ctx, sem, conns, errors):
    async with sem:
        try:
            reader, writer = await asyncio.wait_for(
                asyncio.open_connection(host, port, ssl=ctx, server_hostname=host), 30
            )
            writer.write(f"GET / HTTP/1.1\r\nHost: {host}\r\nUser-Agent: idle-conns\r\n\r\n".encode())
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 30)
            status = head.split(b" ", 2)[1]
            length = 0
            for line in head.split(b"\r\n")[1:]:
                name, _, value = line.partition(b":")
                if name.strip().lower() == b"content-length":
                    length = int(value.strip())
                if name.strip().lower() == b"transfer-encoding":
                    raise RuntimeError("chunked response; expected Content-Length")
            await asyncio.wait_for(reader.readexactly(length), 30)
            if status != b"200":
                raise RuntimeError(f"status {status.decode()}")
            conns.append((reader, writer))
        except Exception as e:  # noqa: BLE001 - every failure is only counted
            errors.append(repr(e))


async def main():
    host, port, cafile, n = sys.argv[1], int(sys.argv[2]), sys.argv[3], int(sys.argv[4])
    parallel = int(sys.argv[5]) if len(sys.argv) > 5 else 100
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < n + 100:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, n + 1000), hard))
    ctx = ssl.create_default_context(cafile=cafile)
    ctx.set_alpn_protocols(["http/1.1"])
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    sem = asyncio.Semaphore(parallel)
    conns, errors = [], []
    t0 = time.monotonic()
    await asyncio.gather(*(open_one(host, port, ctx, sem, conns, errors) for _ in range(n)))
    print(f"ready {len(conns)} {len(errors)} {time.monotonic() - t0:.1f}", flush=True)
    if errors:
        print(f"first error: {errors[0]}", file=sys.stderr, flush=True)
    await asyncio.Event().wait()  # idle until killed


if __name__ == "__main__":
    asyncio.run(main())
