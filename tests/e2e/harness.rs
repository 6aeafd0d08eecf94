//! Starting the binary, reading its logs, and the small backends the tests relay to.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;

/// Upper bound for anything a test waits for; reaching it fails the test.
pub const PATIENCE: Duration = Duration::from_secs(30);

pub fn binary() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_l4lb"))
}

/// Raises this test process's own open-file limit: tests with many connections hold both
/// the client and the backend ends.
pub fn raise_nofile() {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    if let Ok((_, hard)) = getrlimit(Resource::RLIMIT_NOFILE) {
        let _ = setrlimit(Resource::RLIMIT_NOFILE, hard, hard);
    }
}

/// A running l4lb process. Its stderr is collected line by line; dropping it kills it.
pub struct Balancer {
    child: Child,
    lines: Arc<Mutex<Vec<String>>>,
    new_line: mpsc::Receiver<()>,
    _dir: tempfile::TempDir,
    /// Bound address of each listener, by name.
    pub listeners: Vec<(String, SocketAddr)>,
}

/// How to start l4lb, beyond its config.
#[derive(Default)]
pub struct Launch {
    /// Extra environment variables.
    pub env: Vec<(&'static str, String)>,
    /// Stop reading its stderr once it is ready (the pipe then fills up).
    pub stop_reading_logs: bool,
    /// A command to run it under, e.g. `ip netns exec NAME` or `prlimit --nofile=64`.
    pub prefix: Vec<String>,
}

impl Balancer {
    /// Writes `config` to a file, starts l4lb on it and waits until it is ready.
    pub fn start(config: &str) -> Balancer {
        Balancer::start_with(config, Launch::default())
    }

    /// Like [`Balancer::start`], with launch options.
    pub fn start_with(config: &str, launch: Launch) -> Balancer {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("l4lb.yaml");
        std::fs::write(&path, config).unwrap();
        let mut command = match launch.prefix.split_first() {
            Some((program, args)) => {
                let mut c = Command::new(program);
                c.args(args).arg(binary());
                c
            }
            None => Command::new(binary()),
        };
        command
            .arg("--config")
            .arg(&path)
            .env(
                "L4LB_LOG",
                std::env::var("L4LB_TEST_LOG").unwrap_or_else(|_| "info".into()),
            )
            .envs(launch.env.iter().map(|(k, v)| (*k, v.as_str())))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        let mut child = command.spawn().expect("start l4lb");
        let stderr = child.stderr.take().unwrap();
        let lines = Arc::new(Mutex::new(Vec::new()));
        let (tx, rx) = mpsc::channel();
        let stop_reading = launch.stop_reading_logs;
        {
            let lines = Arc::clone(&lines);
            std::thread::spawn(move || {
                let mut reader = BufReader::new(stderr);
                let mut line = String::new();
                loop {
                    line.clear();
                    match reader.read_line(&mut line) {
                        Ok(0) | Err(_) => break,
                        Ok(_) => {}
                    }
                    let line = line.trim_end().to_string();
                    if std::env::var_os("L4LB_TEST_ECHO").is_some() {
                        eprintln!("l4lb| {line}");
                    }
                    let ready = line.contains(" ready");
                    lines.lock().unwrap().push(line);
                    let _ = tx.send(());
                    if ready && stop_reading {
                        // Hold the pipe open and never read again: l4lb's writes fill it.
                        std::mem::forget(reader);
                        return;
                    }
                }
            });
        }
        let mut balancer = Balancer {
            child,
            lines,
            new_line: rx,
            _dir: dir,
            listeners: Vec::new(),
        };
        balancer.wait_for_log(|l| l.contains(" ready"));
        let listening: Vec<String> =
            balancer.logs_matching(|l| l.contains("listening") && field(l, "listener").is_some());
        for line in listening {
            let name = field(&line, "listener").unwrap();
            let addr = field(&line, "addr").unwrap().parse().unwrap();
            balancer.listeners.push((name, addr));
        }
        balancer
    }

    /// The address of the first listener.
    pub fn addr(&self) -> SocketAddr {
        self.listeners[0].1
    }

    /// The address of the listener called `name`, as last logged (a reload may add or move
    /// listeners).
    pub fn listener(&self, name: &str) -> SocketAddr {
        self.logs_matching(|l| {
            l.contains("listening") && field(l, "listener").as_deref() == Some(name)
        })
        .last()
        .and_then(|l| field(l, "addr"))
        .and_then(|a| a.parse().ok())
        .unwrap_or_else(|| panic!("no listener {name} in the log"))
    }

    /// The admin endpoint's address, from its log line.
    pub fn admin(&self) -> SocketAddr {
        let line = self.wait_for_log(|l| l.contains("admin listening"));
        field(&line, "addr").unwrap().parse().unwrap()
    }

    /// The config file it runs with.
    pub fn config_path(&self) -> PathBuf {
        self._dir.path().join("l4lb.yaml")
    }

    /// Writes a new config and sends SIGHUP; waits for the reload's outcome and returns
    /// its log line (`config reloaded` or `reload refused`).
    pub fn reload(&self, config: &str) -> String {
        std::fs::write(self.config_path(), config).unwrap();
        let before = self.logs_matching(is_reload_outcome).len();
        use nix::sys::signal::{kill, Signal};
        use nix::unistd::Pid;
        kill(Pid::from_raw(self.child.id() as i32), Signal::SIGHUP).unwrap();
        self.wait_for_logs(before + 1, is_reload_outcome)
            .pop()
            .unwrap()
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn logs_matching(&self, pred: impl Fn(&str) -> bool) -> Vec<String> {
        self.lines
            .lock()
            .unwrap()
            .iter()
            .filter(|l| pred(l))
            .cloned()
            .collect()
    }

    /// Blocks until a log line matches; panics with the log after [`PATIENCE`].
    pub fn wait_for_log(&self, pred: impl Fn(&str) -> bool) -> String {
        self.wait_for_logs(1, pred).pop().unwrap()
    }

    /// Blocks until `count` log lines match.
    pub fn wait_for_logs(&self, count: usize, pred: impl Fn(&str) -> bool) -> Vec<String> {
        let deadline = Instant::now() + PATIENCE;
        loop {
            let found = self.logs_matching(&pred);
            if found.len() >= count {
                return found;
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() || self.new_line.recv_timeout(left).is_err() {
                let all = self.lines.lock().unwrap().join("\n");
                panic!(
                    "expected {count} matching log lines, found {}; log:\n{all}",
                    found.len()
                );
            }
        }
    }

    /// Sends SIGTERM.
    pub fn terminate(&self) {
        use nix::sys::signal::{kill, Signal};
        use nix::unistd::Pid;
        kill(Pid::from_raw(self.child.id() as i32), Signal::SIGTERM).unwrap();
    }

    /// Waits up to `limit` for the process to exit (seen as the end of its stderr);
    /// `None` if it is still running then.
    pub fn exit_within(&mut self, limit: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + limit;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.new_line.recv_timeout(left) {
                Ok(()) => continue,
                Err(mpsc::RecvTimeoutError::Disconnected) => break,
                Err(mpsc::RecvTimeoutError::Timeout) => return None,
            }
        }
        Some(self.child.wait().unwrap())
    }

    /// Waits up to `limit` for the process to exit, watching the process itself (for a
    /// balancer whose stderr is no longer read, so its end cannot be seen); `None` if it
    /// is still running then.
    pub async fn process_exit_within(&mut self, limit: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + limit;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return Some(status);
            }
            if Instant::now() >= deadline {
                return None;
            }
            // No exit notification without reading the pipe: look again shortly.
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Waits for the process to exit, bounded by [`PATIENCE`]. The exit is seen as the end
    /// of its stderr, which the reader thread reports by dropping the channel.
    pub fn wait_exit(&mut self) -> ExitStatus {
        let deadline = Instant::now() + PATIENCE;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.new_line.recv_timeout(left) {
                Ok(()) => continue,
                Err(mpsc::RecvTimeoutError::Disconnected) => break,
                Err(mpsc::RecvTimeoutError::Timeout) => panic!("l4lb did not exit"),
            }
        }
        self.child.wait().unwrap()
    }

    /// File descriptors the process holds, split into (sockets, pipes).
    pub fn open_fds(&self) -> (usize, usize) {
        let mut sockets = 0;
        let mut pipes = 0;
        for entry in std::fs::read_dir(format!("/proc/{}/fd", self.pid()))
            .unwrap()
            .flatten()
        {
            if let Ok(target) = std::fs::read_link(entry.path()) {
                let target = target.to_string_lossy().to_string();
                if target.starts_with("socket:") {
                    sockets += 1;
                } else if target.starts_with("pipe:") {
                    pipes += 1;
                }
            }
        }
        (sockets, pipes)
    }
}

impl Drop for Balancer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn is_reload_outcome(line: &str) -> bool {
    line.contains("config reloaded") || line.contains("reload refused")
}

/// One HTTP/1.1 request to the admin endpoint: (status, body).
pub async fn http(
    addr: SocketAddr,
    method: &str,
    path: &str,
    body: &str,
    token: Option<&str>,
) -> (u16, String) {
    let mut s = TcpStream::connect(addr).await.unwrap();
    let auth = token.map_or(String::new(), |t| format!("Authorization: Bearer {t}\r\n"));
    let request = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n{auth}Content-Length: {}\r\n\r\n{body}",
        body.len()
    );
    s.write_all(request.as_bytes()).await.unwrap();
    let mut response = String::new();
    s.read_to_string(&mut response).await.unwrap();
    let status = response
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or_else(|| panic!("not an HTTP response: {response:?}"));
    let body = response
        .split_once("\r\n\r\n")
        .map_or(String::new(), |(_, b)| b.to_string());
    (status, body)
}

/// A port for a real peer (nginx, dnsmasq) to listen on: below the kernel's ephemeral
/// range (32768 and up by default), so no client socket of the busy suite takes it between
/// this check and the peer's bind, free for both TCP and UDP now (dnsmasq binds both), and
/// never handed out twice in this test process (tests run in parallel: two could otherwise
/// pick the same free port before either peer binds it). `attempt` spreads the search.
pub fn peer_port(attempt: u16) -> u16 {
    static GIVEN: Mutex<Vec<u16>> = Mutex::new(Vec::new());
    let mut given = GIVEN.lock().unwrap();
    let base = 20000 + (std::process::id() as u16 % 500) * 20;
    let port = (0..4000u16)
        .map(|i| base.wrapping_add(attempt * 97 + i * 7) % 12000 + 20000)
        .find(|&p| {
            !given.contains(&p)
                && std::net::TcpListener::bind(("127.0.0.1", p)).is_ok()
                && std::net::UdpSocket::bind(("127.0.0.1", p)).is_ok()
        })
        .expect("a free port for a peer");
    given.push(port);
    port
}

/// Whether `line` logs `backend` changing to state `to`.
pub fn state_change(line: &str, backend: SocketAddr, to: &str) -> bool {
    line.contains("backend state changed")
        && field(line, "backend").as_deref() == Some(&backend.to_string())
        && field(line, "to").as_deref() == Some(to)
}

/// The value of `key=value` in a tracing log line.
pub fn field(line: &str, key: &str) -> Option<String> {
    let needle = format!("{key}=");
    line.split_whitespace()
        .find_map(|word| word.strip_prefix(&needle))
        .map(|v| v.trim_matches('"').to_string())
}

/// A config with one TCP listener on 127.0.0.1:0 and one round-robin pool over `backends`.
pub fn config(backends: &[SocketAddr], listener_extra: &str, top_extra: &str) -> String {
    let mut s = format!(
        "workers: 2\ndrain_timeout: 5s\n{top_extra}\nlisteners:\n  - name: test\n    bind: 127.0.0.1:0\n    pool: p\n"
    );
    for line in listener_extra.lines().filter(|l| !l.trim().is_empty()) {
        s.push_str(&format!("    {}\n", line.trim()));
    }
    s.push_str("pools:\n  - name: p\n    backends:\n");
    for b in backends {
        s.push_str(&format!("      - {{ address: \"{b}\" }}\n"));
    }
    s
}

/// One TCP listener over one pool of `backends` (address, weight), with `top_extra` at the
/// top of the file and `pool_extra` lines in the pool.
pub fn pool_config(top_extra: &str, backends: &[(SocketAddr, u32)], pool_extra: &str) -> String {
    let mut s = format!(
        "workers: 2\n{top_extra}\nlisteners:\n  - name: test\n    bind: 127.0.0.1:0\n    pool: p\npools:\n  - name: p\n"
    );
    for line in pool_extra.lines().filter(|l| !l.trim().is_empty()) {
        s.push_str(&format!("    {}\n", line.trim()));
    }
    s.push_str("    backends:\n");
    for (addr, weight) in backends {
        s.push_str(&format!(
            "      - {{ address: \"{addr}\", weight: {weight} }}\n"
        ));
    }
    s
}

/// An address on which nothing listens (bound, then closed): connects are refused.
pub fn dead_addr() -> SocketAddr {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap()
}

/// Starts a backend on 127.0.0.1:0 that runs `serve` for every connection.
pub async fn backend<F, Fut>(serve: F) -> SocketAddr
where
    F: Fn(TcpStream) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let serve = Arc::new(serve);
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                return;
            };
            tokio::spawn(serve(stream));
        }
    });
    addr
}

/// A backend that writes `name` and closes: tells the client which backend it reached.
pub async fn named_backend(name: &'static str) -> SocketAddr {
    backend(move |mut s| async move {
        let _ = s.write_all(name.as_bytes()).await;
        let _ = s.shutdown().await;
        // Wait for the client's close so our FIN is not turned into a RST.
        let mut sink = [0u8; 64];
        while let Ok(n) = s.read(&mut sink).await {
            if n == 0 {
                break;
            }
        }
    })
    .await
}

/// A backend that echoes everything back and closes when the client does.
pub async fn echo_backend() -> SocketAddr {
    backend(|mut s| async move {
        let (mut r, mut w) = s.split();
        let _ = tokio::io::copy(&mut r, &mut w).await;
        let _ = w.shutdown().await;
    })
    .await
}

/// A UDP backend on 127.0.0.1 that echoes every datagram to its sender.
pub async fn udp_echo() -> SocketAddr {
    let socket = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let addr = socket.local_addr().unwrap();
    tokio::spawn(async move {
        let mut buf = vec![0u8; 2048];
        while let Ok((n, from)) = socket.recv_from(&mut buf).await {
            let _ = socket.send_to(&buf[..n], from).await;
        }
    });
    addr
}

/// Connects through the balancer and reads everything the backend says.
pub async fn fetch(addr: SocketAddr) -> std::io::Result<String> {
    let mut s = TcpStream::connect(addr).await?;
    let mut out = String::new();
    s.read_to_string(&mut out).await?;
    Ok(out)
}

/// Deterministic pseudo-random bytes (xorshift), `len` of them, from `seed`.
pub fn random_bytes(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed | 1;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.extend_from_slice(&x.to_le_bytes());
    }
    out.truncate(len);
    out
}

/// A listener whose accept queue is full: the kernel drops further SYNs, so a connect to it
/// hangs until the connector's timeout, like a backend behind a black hole.
pub fn black_hole() -> (socket2::Socket, std::net::TcpStream, SocketAddr) {
    use socket2::{Domain, Socket, Type};
    let listener = Socket::new(Domain::IPV4, Type::STREAM, None).unwrap();
    listener
        .bind(&"127.0.0.1:0".parse::<SocketAddr>().unwrap().into())
        .unwrap();
    listener.listen(0).unwrap();
    let addr = listener.local_addr().unwrap().as_socket().unwrap();
    // Backlog 0 holds one connection; this one fills it and is never accepted.
    let filler = std::net::TcpStream::connect(addr).unwrap();
    (listener, filler, addr)
}

/// A backend that can be killed (its port then refuses) and started again on the same port.
pub struct Killable {
    pub addr: SocketAddr,
    name: &'static str,
    task: Option<JoinHandle<()>>,
}

impl Killable {
    pub async fn start(name: &'static str) -> Killable {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let mut k = Killable {
            addr,
            name,
            task: None,
        };
        k.serve(listener);
        k
    }

    fn serve(&mut self, listener: TcpListener) {
        let name = self.name;
        self.task = Some(tokio::spawn(async move {
            loop {
                let Ok((mut s, _)) = listener.accept().await else {
                    return;
                };
                tokio::spawn(async move {
                    // Name first, then echo: callers learn where they landed and can keep
                    // talking on long-lived connections.
                    let _ = s.write_all(name.as_bytes()).await;
                    let (mut r, mut w) = s.split();
                    let _ = tokio::io::copy(&mut r, &mut w).await;
                });
            }
        }));
    }

    pub async fn kill(&mut self) {
        if let Some(task) = self.task.take() {
            task.abort();
            let _ = task.await; // the listener is closed once the task is gone
        }
    }

    pub async fn restart(&mut self) {
        let listener = TcpListener::bind(self.addr).await.unwrap();
        self.serve(listener);
    }
}

/// Connects, reads the one-letter name, closes.
pub async fn who(lb: SocketAddr) -> std::io::Result<String> {
    let mut s = TcpStream::connect(lb).await?;
    let mut name = [0u8; 1];
    s.read_exact(&mut name).await?;
    Ok(String::from_utf8_lossy(&name).into_owned())
}

/// A real peer process (nginx, HAProxy, PostgreSQL), killed and reaped when dropped, with
/// the directory of its files.
pub struct Peer {
    child: Child,
    _dir: tempfile::TempDir,
}

impl Peer {
    /// Starts `command` (its output discarded unless the command says otherwise).
    pub fn spawn(command: &mut Command, dir: tempfile::TempDir) -> Peer {
        let child = command
            .stdin(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("start {command:?}: {e}"));
        Peer { child, _dir: dir }
    }

    /// The process id, for signals.
    pub fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    /// The process, for reading its output.
    pub fn child(&mut self) -> &mut Child {
        &mut self.child
    }
}

impl Drop for Peer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The path of a program from Debian's packages, or a panic that says how to get it.
pub fn program(candidates: &[&str], package: &str) -> PathBuf {
    candidates
        .iter()
        .map(PathBuf::from)
        .find(|p| p.exists())
        .unwrap_or_else(|| panic!("{package} is not installed: scripts/test.sh installs it"))
}

/// Blocks until something accepts TCP connections on `addr` (bounded by [`PATIENCE`]).
pub fn wait_accepting(addr: SocketAddr, what: &str) {
    let deadline = Instant::now() + PATIENCE;
    while std::net::TcpStream::connect(addr).is_err() {
        assert!(Instant::now() < deadline, "{what} did not start on {addr}");
        std::thread::yield_now();
    }
}

/// Starts nginx in the foreground with `http` as the body of its `http {}` block (temp
/// paths and logs set to its own directory).
pub fn start_nginx(http: &str) -> Peer {
    let dir = tempfile::tempdir().unwrap();
    let prefix = dir.path().display().to_string();
    let conf = format!(
        "daemon off;\nmaster_process off;\npid {prefix}/nginx.pid;\nerror_log {prefix}/error.log warn;\n\
         events {{ worker_connections 256; }}\n\
         http {{\n  access_log off;\n  client_body_temp_path {prefix};\n  proxy_temp_path {prefix};\n  fastcgi_temp_path {prefix};\n  uwsgi_temp_path {prefix};\n  scgi_temp_path {prefix};\n{http}\n}}\n"
    );
    let path = dir.path().join("nginx.conf");
    std::fs::write(&path, conf).unwrap();
    let nginx = program(&["/usr/sbin/nginx", "/usr/bin/nginx"], "nginx");
    let mut command = Command::new(nginx);
    command
        .arg("-c")
        .arg(&path)
        .arg("-p")
        .arg(dir.path())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    Peer::spawn(&mut command, dir)
}
