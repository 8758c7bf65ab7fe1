#!/usr/bin/env python3
"""Hostile and pressing clients against one HTTP/1.1 server (run by benches/hostile).

    hostile.py SCENARIO HOST:PORT [--probes N] [--duration S]

Scenarios:
  budget     100 keep-alive clients each open a connection, send a request and hold the connection
             idle (a closed one is not reopened); meanwhile N probes, one every 0.2 s from 3 s on,
             each a fresh connection with one request: how long each waits for its response head.
  budget-churn  the same, but each idle client reconnects (and sends a request) at once whenever the
             server closes its connection: the server is kept at its limit all along.
  slowloris  1,000 connections each dribble a request head, one header line a second, and reconnect
             1 s after they are cut; meanwhile N probes over the run.
  nonreader  50 clients request /big?bytes=100000000 and never read; every 0.25 s, how many of them the
             server still holds established (its side, from /proc/net/tcp); meanwhile N probes.

Every wait is bounded: a probe gives up after 10 s (counted as not served). Prints one line of results.
"""
import asyncio
import socket
import statistics
import sys
import time

PROBE_TIMEOUT = 10.0


async def probe(host, port):
    """One fresh client, one request: seconds to the response head, or why it failed."""
    t0 = time.monotonic()
    w = None
    try:
        r, w = await asyncio.wait_for(asyncio.open_connection(host, port), PROBE_TIMEOUT)
        w.write(b"GET / HTTP/1.1\r\nHost: bench\r\nConnection: close\r\n\r\n")
        left = PROBE_TIMEOUT - (time.monotonic() - t0)
        head = await asyncio.wait_for(r.readuntil(b"\r\n\r\n"), max(left, 0.01))
        if not head.startswith(b"HTTP/1.1 200"):
            return "status " + head.split(b"\r\n")[0].decode("latin-1")[9:12]
        return time.monotonic() - t0
    except asyncio.TimeoutError:
        return "timeout"
    except (asyncio.IncompleteReadError, ConnectionResetError):
        return "closed"
    except OSError as err:
        return err.strerror or type(err).__name__
    finally:
        if w is not None:
            w.close()


async def probes(host, port, n, every, start):
    await asyncio.sleep(start)
    tasks = []
    for _ in range(n):
        tasks.append(asyncio.create_task(probe(host, port)))
        await asyncio.sleep(every)
    return await asyncio.gather(*tasks)


async def idle_client(host, port, stop, stats, reconnect):
    """Keeps one keep-alive connection, idle after its request; when the server closes it, reconnects at
    once (`reconnect`) or not at all."""
    while not stop.is_set():
        w = None
        try:
            r, w = await asyncio.wait_for(asyncio.open_connection(host, port), 5)
            w.write(b"GET / HTTP/1.1\r\nHost: bench\r\n\r\n")
            await asyncio.wait_for(r.readuntil(b"\r\n\r\n"), 5)
            stats["held"] += 1
            # The body ("hello"), then idle until the server closes it (EOF or reset) or the run ends.
            stopped = asyncio.create_task(stop.wait())
            while True:
                data = asyncio.create_task(r.read(65536))
                await asyncio.wait({data, stopped}, return_when=asyncio.FIRST_COMPLETED)
                if not data.done():
                    data.cancel()
                    break
                if not data.result():
                    break
            stopped.cancel()
            if not stop.is_set():
                stats["closed"] += 1
        except Exception as err:
            stats["errors"] += 1
            why = "timeout" if isinstance(err, asyncio.TimeoutError) else (
                "closed" if isinstance(err, (asyncio.IncompleteReadError, ConnectionResetError))
                else type(err).__name__)
            stats["why"][why] = stats["why"].get(why, 0) + 1
            await asyncio.sleep(0.1)
        finally:
            if w is not None:
                w.close()
        if not reconnect:
            return


async def slowloris(host, port, stop, stats):
    """Dribbles a request head, one header line a second, never ending it; reconnects 1 s after it is
    cut (as a slowloris tool keeps its count of sockets)."""
    while not stop.is_set():
        w = None
        try:
            r, w = await asyncio.wait_for(asyncio.open_connection(host, port), 5)
            stats["opened"] += 1
            w.write(b"GET / HTTP/1.1\r\nHost: bench\r\n")
            await w.drain()
            t0 = time.monotonic()
            while not stop.is_set():
                try:
                    data = await asyncio.wait_for(r.read(4096), 1.0)
                    if not data:
                        break
                    # An answer (408, 400): the server ended it.
                    break
                except asyncio.TimeoutError:
                    pass
                w.write(b"X-Dribble: a\r\n")
                await w.drain()
            if not stop.is_set():
                stats["cut"] += 1
                stats["cut_after"].append(time.monotonic() - t0)
        except Exception:
            stats["errors"] += 1
        finally:
            if w is not None:
                w.close()
        await asyncio.sleep(1.0)


def established(port):
    """The server's established connections on PORT (its side: local port PORT), from /proc/net/tcp."""
    n = 0
    with open("/proc/net/tcp") as f:
        next(f)
        for line in f:
            fields = line.split()
            if int(fields[1].split(":")[1], 16) == port and fields[3] == "01":
                n += 1
    return n


def summary(waits):
    served = sorted(w for w in waits if isinstance(w, float))
    failed = {}
    for w in waits:
        if not isinstance(w, float):
            failed[w] = failed.get(w, 0) + 1
    why = " (" + ", ".join(f"{k} {v}" for k, v in sorted(failed.items())) + ")" if failed else ""
    if not served:
        return f"served 0/{len(waits)}{why}"
    # nearest rank
    q = lambda p: served[max(0, -(-int(p * 100) * len(served) // 100) - 1)] * 1000
    return (f"served {len(served)}/{len(waits)}{why}  p50 {q(0.5):.1f} ms  p99 {q(0.99):.1f} ms  "
            f"max {served[-1] * 1000:.1f} ms")


async def main():
    scenario, addr = sys.argv[1], sys.argv[2]
    host, port = addr.rsplit(":", 1)
    port = int(port)
    opts = dict(zip(sys.argv[3::2], sys.argv[4::2]))
    n = int(opts.get("--probes", 50))
    duration = float(opts.get("--duration", 20))
    stop = asyncio.Event()

    if scenario in ("budget", "budget-churn"):
        stats = {"held": 0, "closed": 0, "errors": 0, "why": {}}
        clients = []
        for _ in range(100):
            clients.append(asyncio.create_task(
                idle_client(host, port, stop, stats, scenario == "budget-churn")))
        # Give the 100 time to connect (the server holds at most its budget), then probe.
        waits = await probes(host, port, n, 0.2, 3.0)
        stop.set()
        await asyncio.gather(*clients, return_exceptions=True)
        print(f"{summary(waits)}  | idle clients: {stats['held']} connections served, "
              f"{stats['closed']} closed by the server while idle, {stats['errors']} failed "
              f"({', '.join(f'{k} {v}' for k, v in sorted(stats['why'].items()))})")
    elif scenario == "slowloris":
        stats = {"opened": 0, "cut": 0, "errors": 0, "cut_after": []}
        clients = []
        for i in range(1000):
            clients.append(asyncio.create_task(slowloris(host, port, stop, stats)))
            if i % 50 == 49:
                await asyncio.sleep(0.05)
        waits = await probes(host, port, n, duration / n, 2.0)
        stop.set()
        await asyncio.gather(*clients, return_exceptions=True)
        cut = sorted(stats["cut_after"])
        med = f"{statistics.median(cut):.1f} s" if cut else "-"
        print(f"{summary(waits)}  | slowloris: {stats['opened']} connections opened, {stats['cut']} cut "
              f"(median after {med}), {stats['errors']} failed to connect or write")
    elif scenario == "nonreader":
        socks = []
        t0 = time.monotonic()
        for _ in range(50):
            s = socket.socket()
            s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)
            s.settimeout(5)
            s.connect((host, port))
            s.sendall(b"GET /big?bytes=100000000 HTTP/1.1\r\nHost: bench\r\n\r\n")
            socks.append(s)
        base = 0  # the server's established connections besides the non-readers (the probes' are short)
        timeline = []
        probe_task = asyncio.create_task(probes(host, port, n, duration / n, 1.0))
        first_cut = all_cut = None
        while time.monotonic() - t0 < duration + 2:
            held = max(established(port) - base, 0)
            t = time.monotonic() - t0
            timeline.append((t, held))
            if held < 50 and first_cut is None:
                first_cut = t
            if held == 0 and all_cut is None:
                all_cut = t
                break
            await asyncio.sleep(0.25)
        waits = await probe_task
        for s in socks:
            s.close()
        fmt = lambda t: f"{t:.2f} s" if t is not None else f"not within {duration + 2:.0f} s"
        print(f"{summary(waits)}  | non-readers: first cut {fmt(first_cut)}, all cut {fmt(all_cut)}, "
              f"still held at the end {timeline[-1][1]}")
    else:
        sys.exit(f"unknown scenario {scenario}")


asyncio.run(main())
