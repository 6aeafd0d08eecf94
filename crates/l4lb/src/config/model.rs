//! The validated configuration the runtime is built from, its defaults and its limits.
//! Everything here has passed `validate`: every value is in its documented range.

use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::ops::RangeInclusive;
use std::time::Duration;

use ipnet::IpNet;
use l4_balance::{Algorithm, BackendSpec, OnDown, OutlierSettings};
use l4_core::admission::AccessList;
use l4_core::proxy_protocol::ProxyProtocol;
use l4_core::relay::RelayMode;
pub use l4_core::udp::ProxyUdp;
use l4_health::HealthSettings;

/// Defaults applied where neither a listener nor `defaults:` says otherwise.
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
/// See [`DEFAULT_CONNECT_TIMEOUT`].
pub const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(600);
/// See [`DEFAULT_CONNECT_TIMEOUT`].
pub const DEFAULT_RETRIES: u32 = 2;
/// See [`DEFAULT_CONNECT_TIMEOUT`].
pub const DEFAULT_DRAIN_TIMEOUT: Duration = Duration::from_secs(30);
/// See [`DEFAULT_CONNECT_TIMEOUT`].
pub const DEFAULT_MAX_CONNECTIONS: usize = 100_000;
/// See [`DEFAULT_CONNECT_TIMEOUT`].
pub const DEFAULT_UDP_IDLE_TIMEOUT: Duration = Duration::from_secs(30);
/// See [`DEFAULT_CONNECT_TIMEOUT`].
pub const DEFAULT_MAX_FLOWS: usize = 100_000;
/// See [`DEFAULT_CONNECT_TIMEOUT`]: splice pipes per process (pooled or in use).
pub const DEFAULT_MAX_PIPES: usize = 1024;

// Ranges: every value has one, so nothing that passes `--check` can make l4lb allocate
// without bound, overflow a deadline, spin, or hang at start. README lists them.

/// Worker threads.
pub const WORKERS: RangeInclusive<usize> = 1..=256;
/// Splice pipes per process.
pub const MAX_PIPES: RangeInclusive<usize> = 0..=1_000_000;
/// Concurrent TCP connections per listener.
pub const MAX_CONNECTIONS: RangeInclusive<usize> = 1..=10_000_000;
/// UDP flows per listener (each costs a socket and about 1.3 KiB).
pub const MAX_FLOWS: RangeInclusive<usize> = 1..=4_000_000;
/// Other backends tried after a failed connect.
pub const RETRIES: RangeInclusive<u32> = 0..=16;
/// Backends per pool.
pub const MAX_BACKENDS: usize = 10_000;
/// Maglev lookup table sizes (prime, and at least 10 slots per backend).
pub const TABLE_SIZE: RangeInclusive<u32> = 2..=1_000_003;
/// Per-source limits (connections, or new connections or flows per second).
pub const PER_SOURCE: RangeInclusive<u32> = 1..=10_000_000;
/// Health `rise` and `fall`.
pub const RISE_FALL: RangeInclusive<u32> = 1..=100;
/// Local source addresses per pool.
pub const MAX_SOURCES: usize = 64;
/// `connect_timeout`.
pub const CONNECT_TIMEOUT: RangeInclusive<Duration> =
    Duration::from_millis(1)..=Duration::from_secs(300);
/// `idle_timeout`.
pub const IDLE_TIMEOUT: RangeInclusive<Duration> =
    Duration::from_millis(1)..=Duration::from_secs(7 * 24 * 3600);
/// `drain_timeout`.
pub const DRAIN_TIMEOUT: RangeInclusive<Duration> =
    Duration::from_millis(1)..=Duration::from_secs(24 * 3600);
/// Health `interval`: probes no more often than every 10ms.
pub const HEALTH_INTERVAL: RangeInclusive<Duration> =
    Duration::from_millis(10)..=Duration::from_secs(3600);
/// Health `timeout`.
pub const HEALTH_TIMEOUT: RangeInclusive<Duration> =
    Duration::from_millis(1)..=Duration::from_secs(60);
/// Passive `ejection_time` and `max_ejection_time`.
pub const EJECTION_TIME: RangeInclusive<Duration> =
    Duration::from_millis(1)..=Duration::from_secs(3600);
/// Passive `failures`.
pub const PASSIVE_FAILURES: RangeInclusive<u32> = 1..=1000;
/// `sni_timeout` and `accept_proxy.timeout`: how long a client may take to send what a
/// route is chosen by.
pub const PREREAD_TIMEOUT: RangeInclusive<Duration> =
    Duration::from_millis(1)..=Duration::from_secs(300);
/// Default `sni_timeout` (HAProxy's usual `tcp-request inspect-delay`).
pub const DEFAULT_SNI_TIMEOUT: Duration = Duration::from_secs(5);
/// Default `accept_proxy.timeout`.
pub const DEFAULT_ACCEPT_PROXY_TIMEOUT: Duration = Duration::from_secs(3);
/// `discovery.interval`.
pub const DISCOVERY_INTERVAL: RangeInclusive<Duration> =
    Duration::from_millis(100)..=Duration::from_secs(3600);
/// Default `discovery.interval`.
pub const DEFAULT_DISCOVERY_INTERVAL: Duration = Duration::from_secs(10);
/// `shutdown_delay`.
pub const SHUTDOWN_DELAY: RangeInclusive<Duration> =
    Duration::from_millis(1)..=Duration::from_secs(3600);
/// `slow_start`.
pub const SLOW_START: RangeInclusive<Duration> =
    Duration::from_millis(1)..=Duration::from_secs(3600);
/// `close_after`.
pub const CLOSE_AFTER: RangeInclusive<Duration> =
    Duration::from_millis(1)..=Duration::from_secs(24 * 3600);
/// Bytes a health check sends or expects at most.
pub const MAX_CHECK_BYTES: usize = 4096;
/// SNI routes per listener.
pub const MAX_SNI_ROUTES: usize = 10_000;

/// A validated configuration.
#[derive(Debug, Clone)]
pub struct Config {
    /// Worker threads, each with its own listening sockets.
    pub workers: usize,
    /// How long live connections may take to finish after SIGTERM.
    pub drain_timeout: Duration,
    /// After SIGTERM, how long to keep accepting (not ready) before draining, while
    /// routers stop sending (BGP withdrawal, load balancer health checks).
    pub shutdown_delay: Duration,
    /// Splice pipes per process (split over the workers); 0 never splices.
    pub max_pipes: usize,
    /// The admin endpoint's address, if any.
    pub admin: Option<SocketAddr>,
    /// The bearer token the admin endpoint requires, if any (required off loopback).
    pub admin_token: Option<String>,
    /// Where the access log (one line per connection or UDP flow) goes.
    pub access_log: AccessLog,
    /// Listeners, in file order.
    pub listeners: Vec<Listener>,
    /// Pools, in file order.
    pub pools: Vec<PoolConfig>,
}

/// Where the access log goes.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum AccessSink {
    /// Nowhere.
    Off,
    /// Standard error, with the rest of the log (the default).
    #[default]
    Stderr,
    /// A file of its own, appended to, reopened on SIGUSR1 (logrotate's convention).
    File(std::path::PathBuf),
}

/// The access log's settings.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct AccessLog {
    /// Where.
    pub sink: AccessSink,
    /// One JSON object per line instead of text.
    pub json: bool,
}

/// Transport of a listener.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ListenerProtocol {
    /// TCP connections.
    Tcp,
    /// UDP flows.
    Udp,
}

impl ListenerProtocol {
    /// The name used in the config and logs.
    pub fn as_str(self) -> &'static str {
        match self {
            ListenerProtocol::Tcp => "tcp",
            ListenerProtocol::Udp => "udp",
        }
    }
}

/// A validated listener.
#[derive(Debug, Clone, PartialEq)]
pub struct Listener {
    /// Unique name.
    pub name: String,
    /// Address to listen on.
    pub bind: SocketAddr,
    /// TCP (UDP arrives with its own issue).
    pub protocol: ListenerProtocol,
    /// The pool that receives this listener's connections.
    pub pool: String,
    /// Header sent to backends.
    pub proxy_protocol: ProxyProtocol,
    /// Source address rules.
    pub access: AccessList,
    /// Concurrent connections at most, across workers.
    pub max_connections: usize,
    /// Per-attempt connect limit.
    pub connect_timeout: Duration,
    /// Close after this long without traffic.
    pub idle_timeout: Duration,
    /// Other backends to try when a connect fails.
    pub retries: u32,
    /// Splice or copy.
    pub relay: RelayMode,
    /// UDP: flows at most, across workers.
    pub max_flows: usize,
    /// TCP: concurrent connections per source address at most.
    pub max_connections_per_source: Option<u32>,
    /// TCP: new connections per second per source address at most.
    pub max_new_connections_per_second_per_source: Option<u32>,
    /// UDP: new flows per second per source address at most.
    pub max_new_flows_per_second_per_source: Option<u32>,
    /// TCP: routes by TLS server name, in file order.
    pub sni: Vec<SniRoute>,
    /// TCP: how long to wait for the ClientHello.
    pub sni_timeout: Duration,
    /// TCP: answer PostgreSQL's SSLRequest and route by the ClientHello that follows.
    pub sni_postgres: bool,
    /// A PROXY header expected from these upstreams.
    pub accept_proxy: Option<AcceptProxyConfig>,
    /// UDP with `proxy_protocol: v2`: which datagrams carry the header.
    pub proxy_protocol_udp: ProxyUdp,
    /// Bind even if the address is not (yet) local (`IP_FREEBIND`).
    pub freebind: bool,
}

/// What DNS record type discovery asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DiscoveryKind {
    /// IPv4 addresses, with `port`.
    A,
    /// IPv6 addresses, with `port`.
    Aaaa,
    /// Targets, ports, priorities and weights.
    Srv,
}

/// `discovery:` of a pool.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Discovery {
    /// The name resolved.
    pub name: String,
    /// The record type.
    pub kind: DiscoveryKind,
    /// The backends' port (A and AAAA).
    pub port: u16,
    /// Resolve again this often (sooner when the answer's TTL ends first).
    pub interval: Duration,
    /// The DNS server asked (default: the system's resolv.conf).
    pub resolver: Option<SocketAddr>,
}

/// One `sni:` route.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SniRoute {
    /// `name.example` or `*.example`.
    pub pattern: String,
    /// The pool it goes to.
    pub pool: String,
}

/// `accept_proxy:`.
#[derive(Debug, Clone, PartialEq)]
pub struct AcceptProxyConfig {
    /// The upstreams trusted to send a header; everyone else is refused.
    pub from: Vec<IpNet>,
    /// TCP: how long the header may take.
    pub timeout: Duration,
}

/// A validated pool.
#[derive(Debug, Clone, PartialEq)]
pub struct PoolConfig {
    /// Unique name.
    pub name: String,
    /// Selection algorithm.
    pub algorithm: Algorithm,
    /// Active checks (of up backends only with `health:`; down and ejected ones always).
    pub health: HealthSettings,
    /// Passive detection (outlier ejection) on the data path.
    pub passive: OutlierSettings,
    /// Backends from DNS instead of `backends:`.
    pub discovery: Option<Discovery>,
    /// What happens to a backend's live connections when checks mark it down.
    pub on_down: OnDown,
    /// A backend that comes back up or is added ramps to its full weight over this long
    /// (zero: at once).
    pub slow_start: Duration,
    /// With `on_down: close`: how long the live connections of a backend a reload
    /// removed may go on before they are reset.
    pub close_after: Duration,
    /// Local addresses connections and flows to the backends leave from (empty: chosen by
    /// the route). Each adds a full range of local ports.
    pub source: Vec<IpAddr>,
    /// Backends in file order.
    pub backends: Vec<BackendSpec>,
}

/// One problem found in the config, with where it is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    /// Where: `listeners[1].bind`, or empty for the whole file.
    pub path: String,
    /// What is wrong.
    pub message: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.path.is_empty() {
            f.write_str(&self.message)
        } else {
            write!(f, "{}: {}", self.path, self.message)
        }
    }
}

/// Every problem found, in file order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigErrors(pub Vec<ConfigError>);

impl fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, e) in self.0.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(f, "{e}")?;
        }
        Ok(())
    }
}

impl std::error::Error for ConfigErrors {}
