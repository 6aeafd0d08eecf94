#!/usr/bin/env python3
"""Side-by-side benchmark: l4lb vs HAProxy (mode tcp, splice-auto) vs nginx stream vs the
backend directly, on loopback, same worker count, scenarios interleaved over rounds.

Run through scripts/bench.sh, which installs the tools and builds l4lb. Prints one
table of medians with the ratios l4lb/HAProxy, l4lb/nginx and l4lb/direct. Everything
it starts is stopped by pid on exit. Load goes to 127.0.0.1 only.
"""

import json
import os
import re
import resource
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
L4LB = os.path.join(ROOT, "target", "release", "l4lb")
WORKERS = int(os.environ.get("BENCH_WORKERS", "2"))
ROUNDS = int(os.environ.get("BENCH_ROUNDS", "3"))
SECONDS = int(os.environ.get("BENCH_SECONDS", "2"))
IDLE_CONNS = int(os.environ.get("BENCH_IDLE_CONNS", "7500"))
ONLY = set(filter(None, os.environ.get("BENCH_ONLY", "").split(",")))
# Another l4lb binary (a build of an earlier commit) run beside this one in the same rounds:
# this VM's numbers move 15-30% between runs, so a change is judged against its base within
# one run, not against a table from an earlier run.
BASELINE = os.environ.get("BENCH_BASELINE")

HTTP_BACKENDS = [18081, 18082]
IPERF = 15201
PORTS = {  # target -> (http port, iperf port)
    "direct": (HTTP_BACKENDS[0], IPERF),
    "l4lb": (18101, 15202),
    "haproxy": (18102, 15203),
    "nginx": (18103, 15204),
    "base": (18104, 15205),
    # l4lb and the baseline again, under callgrind, for the instruction counts.
    "l4lb-callgrind": (18107, 15206),
    "base-callgrind": (18108, 15207),
    "nginx-callgrind": (18109, None),
}
ADMIN = {"l4lb": 19900, "base": 19901, "l4lb-callgrind": 19902, "base-callgrind": 19903}  # admin endpoints, scraped once a second as Prometheus would

procs = []
tmp = tempfile.mkdtemp(prefix="l4lb-bench-")


def start(cmd, **kw):
    p = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=open(os.path.join(tmp, os.path.basename(cmd[0]) + ".err"), "a"), **kw)
    procs.append(p)
    return p


def stop_all():
    for p in reversed(procs):
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
    deadline = time.time() + 5
    for p in procs:
        try:
            p.wait(timeout=max(0.1, deadline - time.time()))
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


def wait_port(port, timeout=15):
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return
        except OSError:
            time.sleep(0.05)
    raise SystemExit(f"port {port} did not open")


def write(name, text):
    path = os.path.join(tmp, name)
    with open(path, "w") as f:
        f.write(text)
    return path


def start_backends():
    servers = "\n".join(
        f"server {{ listen 127.0.0.1:{p} reuseport; access_log off; location / {{ return 200 'hello from {p}\\n'; }} }}"
        for p in HTTP_BACKENDS
    )
    conf = write("backend-nginx.conf", f"""
worker_processes 1;
pid {tmp}/backend-nginx.pid;
error_log {tmp}/backend-nginx.log warn;
events {{ worker_connections 65536; }}
worker_rlimit_nofile 19000;
http {{ keepalive_requests 1000000; {servers} }}
""")
    start(["nginx", "-g", "daemon off;", "-c", conf, "-p", tmp])
    start(["iperf3", "-s", "-p", str(IPERF), "-B", "127.0.0.1"])
    for p in HTTP_BACKENDS + [IPERF]:
        wait_port(p)


def start_l4lb(binary, target, wrapper=()):
    http, iperf = PORTS[target]
    backends = "\n".join(f"      - {{ address: 127.0.0.1:{p} }}" for p in HTTP_BACKENDS)
    conf = write(f"{target}.yaml", f"""
workers: {WORKERS}
drain_timeout: 1s
admin: 127.0.0.1:{ADMIN[target]}
listeners:
  - {{ name: http, bind: "127.0.0.1:{http}", pool: http, max_connections: 200000 }}
  - {{ name: iperf, bind: "127.0.0.1:{iperf}", pool: iperf }}
  - {{ name: iperf-udp, bind: "127.0.0.1:{iperf}", protocol: udp, pool: iperf-udp }}
pools:
  - name: http
    backends:
{backends}
  - name: iperf
    backends: [ {{ address: "127.0.0.1:{IPERF}" }} ]
  # iperf3 opens its UDP port only during a test: between tests the port is closed, the
  # last datagrams of a test meet ICMP port unreachable, and passive detection would
  # (rightly) eject the backend and its probe prove it down, dropping the next test's
  # setup datagram (iperf3 then hangs). A real UDP service keeps its port open; here
  # ejection is off.
  - name: iperf-udp
    passive: {{ max_ejection_percent: 0 }}
    backends: [ {{ address: "127.0.0.1:{IPERF}" }} ]
""")
    # The log level a user gets by default (info: one line per connection), written to a
    # file as a journal would take it; the writer is off the workers.
    env = {k: v for k, v in os.environ.items() if k != "L4LB_LOG"}
    return start(list(wrapper) + [binary, "--config", conf], env=env)


def start_proxies():
    l4 = start_l4lb(L4LB, "l4lb")
    base = start_l4lb(BASELINE, "base") if BASELINE else None

    http, iperf = PORTS["haproxy"]
    servers = "\n".join(f"    server b{p} 127.0.0.1:{p}" for p in HTTP_BACKENDS)
    conf = write("haproxy.cfg", f"""
global
    nbthread {WORKERS}
    maxconn 7900
defaults
    mode tcp
    option splice-auto
    timeout connect 3s
    timeout client 60s
    timeout server 60s
frontend http
    bind 127.0.0.1:{http}
    default_backend http
backend http
    balance roundrobin
{servers}
frontend iperf
    bind 127.0.0.1:{iperf}
    default_backend iperf
backend iperf
    server iperf 127.0.0.1:{IPERF}
""")
    ha = start(["haproxy", "-db", "-f", conf])

    http, iperf = PORTS["nginx"]
    servers = "\n".join(f"    server 127.0.0.1:{p};" for p in HTTP_BACKENDS)
    conf = write("nginx-stream.conf", f"""
load_module /usr/lib/nginx/modules/ngx_stream_module.so;
worker_processes {WORKERS};
pid {tmp}/nginx-stream.pid;
error_log {tmp}/nginx-stream.log warn;
worker_rlimit_nofile 19000;
events {{ worker_connections 19000; }}
stream {{
  upstream http {{
{servers}
  }}
  upstream iperf {{ server 127.0.0.1:{IPERF}; }}
  server {{ listen 127.0.0.1:{http} reuseport; proxy_pass http; }}
  server {{ listen 127.0.0.1:{iperf} reuseport; proxy_pass iperf; }}
  server {{ listen 127.0.0.1:{iperf} udp reuseport; proxy_pass iperf; proxy_timeout 10s; }}
}}
""")
    ng = start(["nginx", "-g", "daemon off;", "-c", conf, "-p", tmp])
    pids = {"l4lb": [l4.pid], "haproxy": [ha.pid], "nginx": [ng.pid]}
    if base:
        pids["base"] = [base.pid]
    for t in pids:
        for p in PORTS[t]:
            wait_port(p)
    for t in ("l4lb", "base"):
        if t in pids:
            wait_port(ADMIN[t])
            threading.Thread(target=scrape_metrics, args=(t,), daemon=True).start()
    return pids


scrapes = {"ok": 0, "failed": 0, "last": ""}


def scrape_metrics(target):
    """GET /metrics once a second for the whole benchmark: what a user's Prometheus does.
    Only this l4lb's scrapes are counted and reported; the baseline is scraped alike."""
    import urllib.request
    while True:
        try:
            body = urllib.request.urlopen(f"http://127.0.0.1:{ADMIN[target]}/metrics", timeout=2).read()
            if target == "l4lb":
                scrapes["last"] = body.decode("utf-8", "replace")
                scrapes["ok"] += 1
        except OSError:
            if target == "l4lb":
                scrapes["failed"] += 1
        time.sleep(1)


def run(cmd, timeout=None):
    """Runs a load tool, bounded: a hung run counts as no result, not a stuck benchmark."""
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout or SECONDS + 10)
    except subprocess.TimeoutExpired:
        print(f"timed out: {' '.join(cmd)}", file=sys.stderr)
        return subprocess.CompletedProcess(cmd, 1, "", "")


def iperf(port, *extra):
    for _ in range(3):  # the iperf3 server serves one test at a time; retry if busy
        r = run(["iperf3", "-c", "127.0.0.1", "-p", str(port), "-t", str(SECONDS), "-J",
                 "--connect-timeout", "3000", *extra])
        try:
            data = json.loads(r.stdout)
        except json.JSONDecodeError:
            time.sleep(0.5)
            continue
        if "error" in data:
            time.sleep(0.5)
            continue
        return data
    return None


def tcp_gbps(port, *extra):
    d = iperf(port, *extra)
    return d and d["end"]["sum_received"]["bits_per_second"] / 1e9


def udp_kpps(port, *extra):
    d = iperf(port, "-u", "-b", "0", "-l", "64", *extra)
    if not d:
        return None
    s = d["end"]["sum"]
    return (s["packets"] - s["lost_packets"]) / s["seconds"] / 1e3


def parse_latency(text, label):
    m = re.search(rf"^\s*{label}%\s+([\d.]+)(us|ms|s)\s*$", text, re.M)
    if not m:
        return None
    v, unit = float(m.group(1)), m.group(2)
    return v / 1000 if unit == "us" else v if unit == "ms" else v * 1000


def wrk(port, conns, close):
    cmd = ["wrk", "-t", "2", "-c", str(conns), "-d", f"{SECONDS}s", "--latency"]
    if close:
        cmd += ["-H", "Connection: close"]
    r = run(cmd + [f"http://127.0.0.1:{port}/"])
    m = re.search(r"Requests/sec:\s+([\d.]+)", r.stdout)
    n = re.search(r"(\d+) requests in", r.stdout)
    errors = re.search(r"Socket errors: (.*)", r.stdout)
    return {
        "rps": float(m.group(1)) if m else None,
        "requests": int(n.group(1)) if n else 0,
        "p50": parse_latency(r.stdout, "50"),
        "p99": parse_latency(r.stdout, "99"),
        "errors": errors.group(1) if errors else "",
    }


def proc_tree(pids):
    out = set(pids)
    changed = True
    while changed:
        changed = False
        for d in os.listdir("/proc"):
            if d.isdigit() and int(d) not in out:
                try:
                    ppid = int(open(f"/proc/{d}/stat").read().rsplit(")", 1)[1].split()[1])
                except (OSError, IndexError, ValueError):
                    continue
                if ppid in out:
                    out.add(int(d))
                    changed = True
    return out


def rss_kib(pids):
    total = 0
    for pid in proc_tree(pids):
        try:
            for line in open(f"/proc/{pid}/status"):
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
        except OSError:
            pass
    return total


def cpu_seconds(pids):
    tick = os.sysconf("SC_CLK_TCK")
    total = 0
    for pid in proc_tree(pids):
        try:
            fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / tick
        except (OSError, IndexError):
            pass
    return total


def idle_memory(port, pids):
    """KiB of proxy RSS per idle proxied connection, with IDLE_CONNS open."""
    before = rss_kib(pids)
    conns = []
    for i in range(IDLE_CONNS):
        s = socket.socket()
        s.bind((f"127.0.{10 + i // 50000}.{1 + (i // 250) % 200}", 0))
        s.connect(("127.0.0.1", port))
        conns.append(s)
    # An HTTP backend keeps an idle connection open; give the proxy a moment to connect
    # each one upstream (its connects are what we measure), bounded.
    deadline = time.time() + 10
    last = -1
    while time.time() < deadline:
        now = rss_kib(pids)
        if now == last:
            break
        last = now
        time.sleep(0.5)
    after = rss_kib(pids)
    for s in conns:
        s.close()
    return (after - before) / IDLE_CONNS


def syscalls_per_request(port, pids, close):
    """Syscalls the proxy makes per request (per proxied connection with `close`): strace -c
    attached to every thread of the proxy for one wrk run (strace slows it; the counts per
    request are what matter). Returns (total per request, {syscall: per request})."""
    if not shutil.which("strace"):
        return None, {}
    out = os.path.join(tmp, f"strace-{port}-{close}.txt")
    cmd = ["strace", "-c", "-f", "-q", "-o", out]
    for pid in proc_tree(pids):
        try:
            for tid in os.listdir(f"/proc/{pid}/task"):
                cmd += ["-p", tid]
        except OSError:
            pass
    tracer = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(0.5)  # let strace attach before the load starts
    w = ["wrk", "-t", "1", "-c", "16", "-d", f"{SECONDS}s"]
    if close:
        w += ["-H", "Connection: close"]
    r = run(w + [f"http://127.0.0.1:{port}/"])
    tracer.send_signal(signal.SIGINT)
    try:
        tracer.wait(timeout=10)
    except subprocess.TimeoutExpired:
        tracer.kill()
    m = re.search(r"(\d+) requests in", r.stdout)
    requests = int(m.group(1)) if m else 0
    if not requests or not os.path.exists(out):
        return None, {}
    calls = {}
    for line in open(out):
        f = line.split()
        # % time, seconds, usecs/call, calls, [errors,] syscall
        if len(f) >= 5 and f[0][0].isdigit() and f[3].isdigit() and f[-1] != "total":
            calls[f[-1]] = int(f[3])
    total = sum(calls.values())
    return total / requests, {k: v / requests for k, v in calls.items()}


def start_nginx_alone(target, wrapper):
    """nginx's stream proxy as one process (no master: callgrind follows it), same backends."""
    servers = "\n".join(f"    server 127.0.0.1:{p};" for p in HTTP_BACKENDS)
    conf = write(f"{target}.conf", f"""
load_module /usr/lib/nginx/modules/ngx_stream_module.so;
master_process off;
daemon off;
pid {tmp}/{target}.pid;
error_log {tmp}/{target}.log warn;
events {{ worker_connections 4000; }}
stream {{
  upstream http {{
{servers}
  }}
  server {{ listen 127.0.0.1:{PORTS[target][0]}; proxy_pass http; }}
}}
""")
    return start(list(wrapper) + ["nginx", "-c", conf, "-p", tmp])


def instructions_per_request(binary, target, close):
    """Instructions a proxy's own code (user space: the program and libc, every thread)
    executes per proxied connection (close) or keep-alive request, counted by callgrind over
    one wrk run after a warm-up. Unlike time, the count repeats from run to run on this
    noisy machine (within about 1%), so it is how a change to the per-connection code is
    judged. The kernel's work is not counted. `binary` None means nginx. None without
    valgrind."""
    if not shutil.which("valgrind") or not shutil.which("callgrind_control"):
        return None
    out = os.path.join(tmp, f"callgrind-{target}-{close}.out")
    grind = ["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}", "--dump-instr=no"]
    p = start_nginx_alone(target, grind) if binary is None else start_l4lb(binary, target, wrapper=grind)
    url = f"http://127.0.0.1:{PORTS[target][0]}/"
    w = ["wrk", "-t", "1", "-c", "16", "-d", f"{SECONDS}s"] + (["-H", "Connection: close"] if close else [])
    try:
        wait_port(PORTS[target][0], timeout=60)
        run(w + [url])  # warm-up: thread-locals, slabs and pools grow once, not per request
        subprocess.run(["callgrind_control", "-z", str(p.pid)], capture_output=True, timeout=30)
        r = run(w + [url], timeout=SECONDS + 30)
        subprocess.run(["callgrind_control", "-d", str(p.pid)], capture_output=True, timeout=30)
    finally:
        p.terminate()
        p.wait(timeout=30)
    m = re.search(r"(\d+) requests in", r.stdout)
    dump = out + ".1"
    if not m or not int(m.group(1)) or not os.path.exists(dump):
        return None
    total = re.search(r"^summary: (\d+)", open(dump).read(), re.M)
    return int(total.group(1)) / int(m.group(1)) if total else None


def tcp_out_segments():
    """TCP segments sent by the whole machine so far (/proc/net/snmp, Tcp: OutSegs)."""
    lines = [l.split() for l in open("/proc/net/snmp") if l.startswith("Tcp:")]
    return int(lines[1][lines[0].index("OutSegs")])


def segments_per_connection(port):
    """TCP segments on loopback per request with `Connection: close`, every hop counted
    (client, proxy, backend): fewer segments is less kernel work for all three. Counted
    machine-wide; nothing else talks TCP during the run but the once-a-second scrape."""
    before = tcp_out_segments()
    r = run(["wrk", "-t", "1", "-c", "16", "-d", f"{SECONDS}s", "-H", "Connection: close",
             f"http://127.0.0.1:{port}/"])
    m = re.search(r"(\d+) requests in", r.stdout)
    requests = int(m.group(1)) if m else 0
    return (tcp_out_segments() - before) / requests if requests else None


def med(xs):
    """The median of the runs that gave a figure (None when none did)."""
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


def fmt(v):
    return "-" if v is None else (f"{v:.2f}" if v < 100 else f"{v:.0f}")


def ratio(a, b):
    return "-" if a is None or not b else f"{a / b:.2f}x"


def main():
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    for tool in ("iperf3", "wrk", "haproxy", "nginx"):
        if not shutil.which(tool):
            raise SystemExit(f"{tool} missing: run scripts/bench.sh")
    started = time.time()
    start_backends()
    pids = start_proxies()
    targets = ["direct", "l4lb"] + (["base"] if BASELINE else []) + ["haproxy", "nginx"]
    scenarios = [
        ("tcp 1 stream (Gbit/s)", lambda t: tcp_gbps(PORTS[t][1])),
        ("tcp 4 streams (Gbit/s)", lambda t: tcp_gbps(PORTS[t][1], "-P", "4")),
        ("tcp 1 stream -R (Gbit/s)", lambda t: tcp_gbps(PORTS[t][1], "-R")),
        ("tcp 4 streams -R (Gbit/s)", lambda t: tcp_gbps(PORTS[t][1], "-P", "4", "-R")),
        ("udp 64B (k datagrams/s)", lambda t: None if t == "haproxy" else udp_kpps(PORTS[t][1])),
        ("udp 64B, 16 flows (k datagrams/s)", lambda t: None if t == "haproxy" else udp_kpps(PORTS[t][1], "-P", "16")),
        ("new conn/s, 32 conns", lambda t: wrk_cpu(t, 32, True)),
        ("new conn/s, 256 conns", lambda t: wrk_cpu(t, 256, True)),
        ("keep-alive req/s, 64 conns", "ka"),
    ]
    if ONLY:
        scenarios = [s for s in scenarios if any(o in s[0] for o in ONLY)]
    results = {}
    cpu_per_gb = []
    # CPU seconds the proxy spent per 100k connections (close) or keep-alive requests.
    cpu_per_100k = {}

    def wrk_cpu(t, conns, close):
        before = cpu_seconds(pids[t]) if t in pids else None
        r = wrk(PORTS[t][0], conns, close)
        if before is not None and r["requests"]:
            label = f"per 100k connections ({conns} conns)" if close else f"per 100k keep-alive requests ({conns} conns)"
            spent = cpu_seconds(pids[t]) - before
            cpu_per_100k.setdefault(label, {}).setdefault(t, []).append(spent / r["requests"] * 1e5)
        return r if not close else r["rps"]
    for rnd in range(ROUNDS):
        for name, fn in scenarios:
            for t in targets:
                if fn == "ka":
                    r = wrk_cpu(t, 64, False)
                    for key, label in (("rps", name), ("p50", "keep-alive p50 (ms)"), ("p99", "keep-alive p99 (ms)")):
                        results.setdefault(label, {}).setdefault(t, []).append(r[key])
                    continue
                if t == "l4lb" and name == "tcp 1 stream (Gbit/s)":
                    c0 = cpu_seconds(pids["l4lb"])
                    t0 = time.time()
                    v = fn(t)
                    spent = cpu_seconds(pids["l4lb"]) - c0
                    if v:
                        gb = v * (time.time() - t0) / 8
                        cpu_per_gb.append(spent / gb)
                else:
                    t0 = time.time()
                    v = fn(t)
                    if time.time() - t0 > SECONDS + 5:
                        print(f"slow run: {name} via {t}: {time.time() - t0:.0f}s", file=sys.stderr)
                results.setdefault(name, {}).setdefault(t, []).append(v)
        print(f"round {rnd + 1}/{ROUNDS} done ({time.time() - started:.0f}s)", file=sys.stderr)
    if not ONLY or "idle" in ONLY:
        for t in [t for t in targets if t != "direct"]:
            results.setdefault(f"idle memory per conn at {IDLE_CONNS} (KiB)", {})[t] = [idle_memory(PORTS[t][0], pids[t])]

    header = f"| scenario | direct | l4lb | HAProxy | nginx | l4lb/HAProxy | l4lb/nginx | l4lb/direct |"
    print(header)
    print("|" + "---|" * 8)
    for name, per in results.items():
        m = {t: med(per.get(t, [])) for t in targets}
        print(f"| {name} | {fmt(m['direct'])} | {fmt(m['l4lb'])} | {fmt(m['haproxy'])} | {fmt(m['nginx'])} | "
              f"{ratio(m['l4lb'], m['haproxy'])} | {ratio(m['l4lb'], m['nginx'])} | {ratio(m['l4lb'], m['direct'])} |")
    if cpu_per_gb:
        print(f"\nl4lb CPU seconds per GB relayed (tcp 1 stream): {statistics.median(cpu_per_gb):.3f}")
    if cpu_per_100k:
        # The proxy's own CPU (user + system, all threads) over the same runs as the table.
        print("\n| proxy CPU seconds | l4lb | HAProxy | nginx |")
        print("|---|---|---|---|")
        for label, per in cpu_per_100k.items():
            cells = [fmt(med(per.get(t, []))) for t in ("l4lb", "haproxy", "nginx")]
            print(f"| {label} | " + " | ".join(cells) + " |")
    if BASELINE:
        print(f"\n| against the baseline ({BASELINE}) | base | l4lb | l4lb/base |")
        print("|---|---|---|---|")
        for name, per in results.items():
            b, l = med(per.get("base", [])), med(per.get("l4lb", []))
            print(f"| {name} | {fmt(b)} | {fmt(l)} | {ratio(l, b)} |")
        for label, per in cpu_per_100k.items():
            b, l = med(per.get("base", [])), med(per.get("l4lb", []))
            print(f"| CPU s {label} | {fmt(b)} | {fmt(l)} | {ratio(l, b)} |")
    if not ONLY or "syscalls" in ONLY:
        # What explains the connection and keep-alive rows: syscalls per proxied
        # connection (Connection: close) and per keep-alive request, for each proxy.
        print("\n| syscalls per request | l4lb | HAProxy | nginx |")
        print("|---|---|---|---|")
        rows = {}
        for t in ("l4lb", "haproxy", "nginx"):
            for label, close in (("per connection (close)", True), ("per keep-alive request", False)):
                total, each = syscalls_per_request(PORTS[t][0], pids[t], close)
                rows.setdefault(label, {})[t] = (total, each)
        for label, per in rows.items():
            cells = []
            for t in ("l4lb", "haproxy", "nginx"):
                total, each = per[t]
                if total is None:
                    cells.append("-")
                    continue
                top = sorted(each.items(), key=lambda kv: -kv[1])[:4]
                cells.append(f"{total:.1f} ({', '.join(f'{k} {v:.1f}' for k, v in top)})")
            print(f"| {label} | " + " | ".join(cells) + " |")
        print("\n| TCP segments per connection (close, every hop) | direct | l4lb | HAProxy | nginx |")
        print("|---|---|---|---|---|")
        segments = [segments_per_connection(PORTS[t][0]) for t in ("direct", "l4lb", "haproxy", "nginx")]
        print("| segments | " + " | ".join(fmt(v) for v in segments) + " |")
    if not ONLY or "instructions" in ONLY:
        # The proxy's own share of the connection rows, free of this VM's noise.
        binaries = [("l4lb", L4LB)] + ([("base", BASELINE)] if BASELINE else []) + [("nginx", None)]
        print("\n| own instructions (callgrind, user space) | " + " | ".join(n for n, _ in binaries)
              + (" | l4lb/base" if BASELINE else "") + " | l4lb/nginx |")
        print("|---|" + "---|" * (len(binaries) + (2 if BASELINE else 1)))
        for label, close in (("per connection (close)", True), ("per keep-alive request", False)):
            counts = {n: instructions_per_request(b, f"{n}-callgrind", close) for n, b in binaries}
            cells = [f"{counts[n]:,.0f}" if counts[n] else "-" for n, _ in binaries]
            if BASELINE:
                cells.append(ratio(counts["l4lb"], counts["base"]))
            cells.append(ratio(counts["l4lb"], counts["nginx"]))
            print(f"| {label} | " + " | ".join(cells) + " |")
    print(f"\n{ROUNDS} rounds, {SECONDS}s per run, {WORKERS} workers each, medians; {time.time() - started:.0f}s in all")
    print(f"l4lb ran with its default log level and its admin endpoint scraped once a second ({scrapes['ok']} scrapes, {scrapes['failed']} failed)")
    # What l4lb refused or dropped over the whole run, to explain a slow or hung scenario.
    drops = [l for l in scrapes["last"].splitlines()
             if l.startswith(("l4lb_udp_dropped_total", "l4lb_listener_rejected_total", "l4lb_udp_flows_evicted_total"))
             and not l.endswith(" 0")]
    print("l4lb drops and refusals at the last scrape: " + (", ".join(drops) if drops else "none"))


if __name__ == "__main__":
    try:
        main()
    finally:
        stop_all()
        shutil.rmtree(tmp, ignore_errors=True)
