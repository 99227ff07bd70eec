"""Opens N keep-alive connections to HOST:PORT, sends one GET on each, reads the
answer, and keeps them all open and idle for HOLD seconds; prints how many answered.
Used by scripts/idle-memory.sh to compare the proxies' memory per idle connection.

    python3 idle_conns.py HOST PORT N HOLD
"""
import asyncio
import sys

host, port, n, hold = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4])


async def one(i, ready, release):
    try:
        r, w = await asyncio.wait_for(asyncio.open_connection(host, port), 10)
        w.write(b"GET / HTTP/1.1\r\nHost: idle\r\nX-User-Id: u%d\r\n\r\n" % i)
        await w.drain()
        head = await asyncio.wait_for(r.readuntil(b"\r\n\r\n"), 10)
        length = 0
        for line in head.split(b"\r\n"):
            if line.lower().startswith(b"content-length:"):
                length = int(line.split(b":")[1])
        await asyncio.wait_for(r.readexactly(length), 10)
        ready.append(head.startswith(b"HTTP/1.1 200"))
        await release.wait()
        w.close()
    except Exception:
        ready.append(False)


async def main():
    ready, release = [], asyncio.Event()
    tasks = []
    for i in range(n):
        tasks.append(asyncio.create_task(one(i, ready, release)))
        if i % 200 == 199:
            await asyncio.sleep(0.05)
    while len(ready) < n:
        await asyncio.sleep(0.1)
    print(f"open {sum(ready)} of {n}", flush=True)
    await asyncio.sleep(hold)
    release.set()
    await asyncio.gather(*tasks)


asyncio.run(main())
