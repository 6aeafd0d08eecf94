"""The io_uring experiment of issue 15: bare-proxy driven by io_uring and by epoll, beside
l4lb, HAProxy and nginx stream in the same rounds (benches/compare.py's backends, proxies and measurements): new connections per
second (32 and 256 conns, `Connection: close`), keep-alive requests (64 conns) with p99,
the proxy's CPU seconds per 100k requests, syscalls and segments per connection.
With the argument `udp` (run.sh udp), the UDP experiment instead: bare-proxy's UDP
forwarder (`udp`: GSO sends as l4lb makes them, `udp-mmsg`: sendmmsg only) beside l4lb,
nginx stream and the backend directly, iperf3 64-byte datagrams with 1 and 16 flows, and
each proxy's CPU per datagram.
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
c.PORTS["udp"] = (None, 15208)
c.PORTS["udp-mmsg"] = (None, 15209)
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


def main_udp():
    c.start_backends()
    pids = c.start_proxies()
    for mode in ("udp", "udp-mmsg"):
        bare = c.start([BARE, mode, str(c.WORKERS), str(c.PORTS[mode][1]), str(c.IPERF)])
        pids[mode] = [bare.pid]
        c.wait_port(c.PORTS[mode][1])
    pids["direct"] = []
    targets = ["direct", "l4lb", "udp", "udp-mmsg", "nginx"]
    rows = {}
    started = time.time()
    for rnd in range(c.ROUNDS):
        for flows in ("1", "16"):
            for t in targets:
                before = c.cpu_seconds(pids[t]) if pids[t] else 0
                d = c.iperf(c.PORTS[t][1], "-u", "-b", "0", "-l", "64", "-P", flows)
                spent = c.cpu_seconds(pids[t]) - before if pids[t] else None
                s = d and d["end"]["sum"]
                got = s and s["packets"] - s["lost_packets"]
                label = f"udp 64B, {flows} flow{'s' if flows != '1' else ''}"
                rows.setdefault(f"{label} (k datagrams/s)", {}).setdefault(t, []).append(
                    got / s["seconds"] / 1e3 if s else None)
                rows.setdefault(f"{label}: lost %", {}).setdefault(t, []).append(s and s["lost_percent"])
                rows.setdefault(f"{label}: proxy CPU us per datagram", {}).setdefault(t, []).append(
                    spent / got * 1e6 if got and spent is not None else None)
        print(f"round {rnd + 1}/{c.ROUNDS} done ({time.time() - started:.0f}s)", file=sys.stderr)
    print("| scenario | direct | l4lb | bare udp (GSO) | bare udp (sendmmsg) | nginx | l4lb/bare | bare/nginx | l4lb/nginx |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name, per in rows.items():
        m = {t: med(per.get(t, [])) for t in targets}
        ratios = ("", "", "") if "lost" in name else (
            ratio(m["l4lb"], m["udp"]), ratio(m["udp"], m["nginx"]), ratio(m["l4lb"], m["nginx"]))
        print(f"| {name} | " + " | ".join(fmt(m[t]) for t in targets) + " | " + " | ".join(ratios) + " |")
    print(f"\n{c.ROUNDS} rounds, {c.SECONDS}s per run, {c.WORKERS} workers each, medians; {time.time() - started:.0f}s")


if __name__ == "__main__":
    try:
        main_udp() if sys.argv[1:] == ["udp"] else main()
    finally:
        c.stop_all()
        shutil.rmtree(c.tmp, ignore_errors=True)
