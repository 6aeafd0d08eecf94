"""The io_uring experiment of issue 15: bare-proxy driven by io_uring and by epoll, beside
l4lb, HAProxy and nginx stream in the same rounds (benches/compare.py's backends, proxies and measurements): new connections per
second (32 and 256 conns, `Connection: close`), keep-alive requests (64 conns) with p99,
the proxy's CPU seconds per 100k requests, syscalls and segments per connection.
Run through run.sh, which builds both binaries."""
import os
import shutil
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import compare as c  # noqa: E402
from compare import fmt, med, ratio  # noqa: E402

BARE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "target", "release", "bare-proxy")
c.PORTS["uring"] = (18105, None)
c.PORTS["epoll"] = (18106, None)
TARGETS = ["l4lb", "uring", "epoll", "haproxy", "nginx"]


def main():
    c.start_backends()
    pids = c.start_proxies()
    for mode in ("uring", "epoll"):
        bare = c.start([BARE, mode, str(c.WORKERS), str(c.PORTS[mode][0])] + [str(p) for p in c.HTTP_BACKENDS])
        pids[mode] = [bare.pid]
        c.wait_port(c.PORTS[mode][0])
    rows = {}
    errors = []
    started = time.time()
    for rnd in range(c.ROUNDS):
        for label, conns, close in (("new conn/s, 32 conns", 32, True), ("new conn/s, 256 conns", 256, True),
                                    ("keep-alive req/s, 64 conns", 64, False)):
            for t in TARGETS:
                before = c.cpu_seconds(pids[t])
                r = c.wrk(c.PORTS[t][0], conns, close)
                spent = c.cpu_seconds(pids[t]) - before
                rows.setdefault(label, {}).setdefault(t, []).append(r["rps"])
                if r["errors"]:
                    # A proxy that resets or drops connections must not pass for a fast one.
                    errors.append(f"{t}, {label}, round {rnd + 1}: {r['errors']}")
                cpu = f"proxy CPU s per 100k requests ({'close' if close else 'keep-alive'}, {conns} conns)"
                rows.setdefault(cpu, {}).setdefault(t, []).append(spent / r["requests"] * 1e5 if r["requests"] else None)
                if not close:
                    rows.setdefault("keep-alive p99 (ms)", {}).setdefault(t, []).append(r["p99"])
        print(f"round {rnd + 1}/{c.ROUNDS} done ({time.time() - started:.0f}s)", file=sys.stderr)

    print("For CPU and p99 rows lower is better, and \"best other\" is the lower of HAProxy and nginx.\n")
    print("| scenario | l4lb | bare io_uring | bare epoll | HAProxy | nginx | io_uring/epoll | io_uring/best other | epoll/l4lb |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name, per in rows.items():
        m = {t: med(per.get(t, [])) for t in TARGETS}
        lower_is_better = "CPU" in name or "p99" in name
        # The best of HAProxy and nginx: the yardstick.
        others = [m[t] for t in ("haproxy", "nginx") if m[t] is not None]
        best = (min if lower_is_better else max)(others) if others else None
        print(f"| {name} | " + " | ".join(fmt(m[t]) for t in TARGETS)
              + f" | {ratio(m['uring'], m['epoll'])} | {ratio(m['uring'], best)} | {ratio(m['epoll'], m['l4lb'])} |")
    print("\n| per connection (close) | syscalls (strace -c, one wrk run) | TCP segments, every hop |")
    print("|---|---|---|")
    for t in TARGETS:
        total, each = c.syscalls_per_request(c.PORTS[t][0], pids[t], True)
        top = sorted(each.items(), key=lambda kv: -kv[1])[:4]
        calls = "-" if total is None else f"{total:.1f} ({', '.join(f'{k} {v:.1f}' for k, v in top)})"
        print(f"| {t} | {calls} | {fmt(c.segments_per_connection(c.PORTS[t][0]))} |")
    print("\nwrk socket errors: " + ("; ".join(errors) if errors else "none"))
    print(f"\n{c.ROUNDS} rounds, {c.SECONDS}s per run, {c.WORKERS} workers each, medians; {time.time() - started:.0f}s")


if __name__ == "__main__":
    try:
        main()
    finally:
        c.stop_all()
        shutil.rmtree(c.tmp, ignore_errors=True)
