//! Validation: the raw file into the model. Every error is collected with its path
//! (`pools[0].backends[2].address: ...`) instead of stopping at the first, so `--check`
//! shows everything to fix at once, and every value is checked against its range, so
//! nothing that passes can crash or hang l4lb.

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::ops::RangeInclusive;
use std::time::Duration;

use ipnet::IpNet;
use l4_balance::{
    is_prime, Algorithm, BackendSpec, HashKey, OnDown, OutlierSettings, TimeMetric,
    DEFAULT_TABLE_SIZE, MAX_WEIGHT,
};
use l4_core::admission::AccessList;
use l4_core::proxy_protocol::ProxyProtocol;
use l4_core::relay::RelayMode;
use l4_core::sni_routes::SniRoutes;
use l4_health::{Check, Expect, HealthSettings};

use super::model::*;
use super::raw::*;

/// Parses and validates a config file's text.
pub fn parse(text: &str) -> Result<Config, ConfigErrors> {
    let raw: RawConfig = serde_yaml_ng::from_str(text).map_err(|e| {
        // serde_yaml_ng's message already carries the path and the line and column.
        ConfigErrors(vec![ConfigError {
            path: String::new(),
            message: e.to_string(),
        }])
    })?;
    Validator::default().validate(raw)
}

#[derive(Default)]
struct Validator {
    errors: Vec<ConfigError>,
}

impl Validator {
    fn error(&mut self, path: impl Into<String>, message: impl Into<String>) {
        self.errors.push(ConfigError {
            path: path.into(),
            message: message.into(),
        });
    }

    /// A duration within `range`; `None` (after recording the error) when it is not one.
    fn duration(
        &mut self,
        path: &str,
        raw: Option<&RawDuration>,
        range: RangeInclusive<Duration>,
    ) -> Option<Duration> {
        let raw = raw?;
        let parsed = match raw {
            RawDuration::Text(text) => humantime::parse_duration(text.trim())
                .map_err(|e| format!("invalid duration {text:?}: {e} (write e.g. 3s, 500ms, 10m)")),
            RawDuration::Number(n) => Err(format!(
                "duration {n} has no unit (write e.g. {n}s or {n}ms)"
            )),
        };
        let show = |d: Duration| humantime::format_duration(d).to_string();
        // Errors quote the value as written.
        let written = match raw {
            RawDuration::Text(text) => text.trim().to_string(),
            RawDuration::Number(n) => n.to_string(),
        };
        match parsed {
            Ok(d) if d.is_zero() => {
                self.error(path, "must be greater than zero");
                None
            }
            Ok(d) if d < *range.start() => {
                self.error(
                    path,
                    format!("{written} is below the minimum {}", show(*range.start())),
                );
                None
            }
            Ok(d) if d > *range.end() => {
                self.error(
                    path,
                    format!("{written} is above the maximum {}", show(*range.end())),
                );
                None
            }
            Ok(d) => Some(d),
            Err(message) => {
                self.error(path, message);
                None
            }
        }
    }

    /// A number within `range`, `default` when absent; out of range is an error naming
    /// the range (and `default` stands in so validation can go on).
    /// [`Validator::duration`] with the value to use when the key is absent or invalid.
    fn duration_or(
        &mut self,
        path: &str,
        raw: Option<&RawDuration>,
        range: RangeInclusive<Duration>,
        default: Duration,
    ) -> Duration {
        self.duration(path, raw, range).unwrap_or(default)
    }

    fn number<T>(&mut self, path: &str, value: Option<T>, range: RangeInclusive<T>, default: T) -> T
    where
        T: PartialOrd + Copy + std::fmt::Display,
    {
        match value {
            Some(v) if range.contains(&v) => v,
            Some(v) => {
                self.error(
                    path,
                    format!("{v} is outside {}..={}", range.start(), range.end()),
                );
                default
            }
            None => default,
        }
    }

    fn validate(mut self, raw: RawConfig) -> Result<Config, ConfigErrors> {
        let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
        let workers = self.number("workers", raw.workers, WORKERS, cpus.min(*WORKERS.end()));
        let max_pipes = self.number("max_pipes", raw.max_pipes, MAX_PIPES, DEFAULT_MAX_PIPES);
        let admin = raw
            .admin
            .as_deref()
            .and_then(|text| match text.parse::<SocketAddr>() {
                Ok(addr) => Some(addr),
                Err(_) => {
                    self.error(
                        "admin",
                        format!("invalid socket address {text:?} (write e.g. 127.0.0.1:9900)"),
                    );
                    None
                }
            });
        let admin_token = raw.admin_token.clone();
        if admin_token.as_deref().is_some_and(|t| t.trim().len() < 16) {
            self.error("admin_token", "must be at least 16 characters");
        }
        if let Some(addr) = admin {
            if !addr.ip().is_loopback() && admin_token.is_none() {
                self.error(
                    "admin",
                    format!("{addr} is not a loopback address: set admin_token, which every request must then send as `Authorization: Bearer <token>`"),
                );
            }
        }
        let access_log = self.access_log(raw.log.as_ref());
        let drain_timeout = self.duration_or(
            "drain_timeout",
            raw.drain_timeout.as_ref(),
            DRAIN_TIMEOUT,
            DEFAULT_DRAIN_TIMEOUT,
        );
        let shutdown_delay = self.duration_or(
            "shutdown_delay",
            raw.shutdown_delay.as_ref(),
            SHUTDOWN_DELAY,
            Duration::ZERO,
        );
        let d = &raw.defaults;
        let default_connect = self.duration_or(
            "defaults.connect_timeout",
            d.connect_timeout.as_ref(),
            CONNECT_TIMEOUT,
            DEFAULT_CONNECT_TIMEOUT,
        );
        let default_idle = self.duration_or(
            "defaults.idle_timeout",
            d.idle_timeout.as_ref(),
            IDLE_TIMEOUT,
            DEFAULT_IDLE_TIMEOUT,
        );
        let default_retries = self.number("defaults.retries", d.retries, RETRIES, DEFAULT_RETRIES);
        let default_relay = self
            .relay_mode("defaults.relay", d.relay.as_deref())
            .unwrap_or_default();

        let udp_pools: HashSet<&str> = raw
            .listeners
            .iter()
            .filter(|l| l.protocol.as_deref() == Some("udp"))
            .filter_map(|l| l.pool.as_deref())
            .collect();
        // A TCP listener's pools: its own and every SNI route's.
        let tcp_pools: HashSet<&str> = raw
            .listeners
            .iter()
            .filter(|l| l.protocol.as_deref() != Some("udp"))
            .flat_map(|l| {
                let routes = l.sni.iter().flatten().map(|r| r.pool.as_str());
                l.pool.as_deref().into_iter().chain(routes)
            })
            .collect();
        let pools = self.pools(&raw.pools, &udp_pools, &tcp_pools);
        let pool_names: HashSet<&str> = raw.pools.iter().map(|p| p.name.as_str()).collect();

        if raw.listeners.is_empty() {
            self.error("listeners", "at least one listener is needed");
        }
        let mut names = HashSet::new();
        let mut binds: HashMap<(SocketAddr, bool), usize> = HashMap::new();
        let mut listeners = Vec::new();
        for (i, l) in raw.listeners.iter().enumerate() {
            let path = format!("listeners[{i}]");
            if !self.name(&format!("{path}.name"), &l.name) {
            } else if !names.insert(l.name.as_str()) {
                self.error(
                    format!("{path}.name"),
                    format!("duplicate listener name {:?}", l.name),
                );
            }
            let is_udp = l.protocol.as_deref() == Some("udp");
            let bind = match l.bind.parse::<SocketAddr>() {
                Ok(addr) => {
                    // TCP and UDP on one port (DNS) is fine; the same twice is not. Port 0
                    // asks for a free port each time, so it never clashes.
                    if addr.port() == 0 {
                    } else if let Some(first) = binds.insert((addr, is_udp), i) {
                        self.error(
                            format!("{path}.bind"),
                            format!("{addr} is already bound by listeners[{first}]"),
                        );
                    }
                    Some(addr)
                }
                Err(_) => {
                    self.error(
                        format!("{path}.bind"),
                        format!(
                            "invalid socket address {:?} (write ip:port, [ipv6]:port)",
                            l.bind
                        ),
                    );
                    None
                }
            };
            let protocol = match l.protocol.as_deref().unwrap_or("tcp") {
                "tcp" => Some(ListenerProtocol::Tcp),
                "udp" if bind.is_some_and(|b: SocketAddr| b.ip().is_unspecified()) => {
                    // Replies leave from the listener's socket; with a wildcard address the
                    // kernel would pick their source by route, not the address the client
                    // reached, and the client would drop them.
                    self.error(
                        format!("{path}.bind"),
                        "udp listeners need a specific address, not a wildcard (replies must come from the address the client reached)",
                    );
                    None
                }
                "udp" => Some(ListenerProtocol::Udp),
                other => {
                    self.error(
                        format!("{path}.protocol"),
                        format!("unknown protocol {other:?} (expected tcp or udp)"),
                    );
                    None
                }
            };
            let mut sni = Vec::new();
            if let Some(routes) = &l.sni {
                let mut table = SniRoutes::default();
                if routes.len() > MAX_SNI_ROUTES {
                    self.error(
                        format!("{path}.sni"),
                        format!("{} routes (at most {MAX_SNI_ROUTES})", routes.len()),
                    );
                }
                for (j, route) in routes.iter().enumerate() {
                    if !pool_names.contains(route.pool.as_str()) {
                        self.error(
                            format!("{path}.sni[{j}].pool"),
                            format!("no pool named {:?}", route.pool),
                        );
                    }
                    if let Err(e) = table.add(&route.pattern, ()) {
                        self.error(format!("{path}.sni[{j}].match"), e.to_string());
                    }
                    sni.push(SniRoute {
                        pattern: route.pattern.clone(),
                        pool: route.pool.clone(),
                    });
                }
                if routes.is_empty() {
                    self.error(
                        format!("{path}.sni"),
                        "an empty list (leave sni out instead)",
                    );
                }
            }
            let sni_postgres = l.sni_postgres.unwrap_or(false);
            if sni_postgres && l.sni.is_none() {
                self.error(
                    format!("{path}.sni_postgres"),
                    "needs sni routes to choose among",
                );
            }
            if l.sni_timeout.is_some() && l.sni.is_none() {
                self.error(
                    format!("{path}.sni_timeout"),
                    "applies only with sni routes",
                );
            }
            let sni_timeout = self.duration_or(
                &format!("{path}.sni_timeout"),
                l.sni_timeout.as_ref(),
                PREREAD_TIMEOUT,
                DEFAULT_SNI_TIMEOUT,
            );
            let accept_proxy = l.accept_proxy.as_ref().map(|raw| {
                let from = self.networks(&format!("{path}.accept_proxy.from"), &raw.from);
                if raw.from.is_empty() {
                    self.error(
                        format!("{path}.accept_proxy.from"),
                        "list the upstream balancers trusted to send a PROXY header",
                    );
                }
                if is_udp && raw.timeout.is_some() {
                    self.error(
                        format!("{path}.accept_proxy.timeout"),
                        "applies to tcp listeners only (each datagram carries its header)",
                    );
                }
                let timeout = self.duration_or(
                    &format!("{path}.accept_proxy.timeout"),
                    raw.timeout.as_ref(),
                    PREREAD_TIMEOUT,
                    DEFAULT_ACCEPT_PROXY_TIMEOUT,
                );
                AcceptProxyConfig { from, timeout }
            });
            let proxy_protocol_udp = match l.proxy_protocol_udp.as_deref() {
                None | Some("first") => ProxyUdp::First,
                Some("every") => ProxyUdp::Every,
                Some(other) => {
                    self.error(
                        format!("{path}.proxy_protocol_udp"),
                        format!("unknown value {other:?} (expected first or every)"),
                    );
                    ProxyUdp::First
                }
            };
            if l.proxy_protocol_udp.is_some()
                && !(is_udp && l.proxy_protocol.as_deref() == Some("v2"))
            {
                self.error(
                    format!("{path}.proxy_protocol_udp"),
                    "applies to udp listeners with proxy_protocol: v2",
                );
            }
            if is_udp && l.proxy_protocol.as_deref() == Some("v1") {
                self.error(
                    format!("{path}.proxy_protocol"),
                    "v1 has no UDP form; use v2",
                );
            }
            let tcp_only: [(&str, bool); 8] = [
                ("max_connections", l.max_connections.is_some()),
                (
                    "max_connections_per_source",
                    l.max_connections_per_source.is_some(),
                ),
                (
                    "max_new_connections_per_second_per_source",
                    l.max_new_connections_per_second_per_source.is_some(),
                ),
                ("sni", l.sni.is_some()),
                ("sni_postgres", l.sni_postgres.is_some()),
                ("relay", l.relay.is_some()),
                ("connect_timeout", l.connect_timeout.is_some()),
                ("retries", l.retries.is_some()),
            ];
            if is_udp {
                for (key, set) in tcp_only {
                    if set {
                        self.error(format!("{path}.{key}"), "applies to tcp listeners only");
                    }
                }
            } else {
                for (key, set) in [
                    ("max_flows", l.max_flows.is_some()),
                    (
                        "max_new_flows_per_second_per_source",
                        l.max_new_flows_per_second_per_source.is_some(),
                    ),
                ] {
                    if set {
                        self.error(
                            format!("{path}.{key}"),
                            format!("{key} applies to udp listeners only"),
                        );
                    }
                }
            }
            let per_source = |v: &mut Self, key: &str, value: Option<u32>| {
                value.map(|n| v.number(&format!("{path}.{key}"), Some(n), PER_SOURCE, 1))
            };
            let max_connections_per_source = per_source(
                &mut self,
                "max_connections_per_source",
                l.max_connections_per_source,
            );
            let max_new_connections_per_second_per_source = per_source(
                &mut self,
                "max_new_connections_per_second_per_source",
                l.max_new_connections_per_second_per_source,
            );
            let max_new_flows_per_second_per_source = per_source(
                &mut self,
                "max_new_flows_per_second_per_source",
                l.max_new_flows_per_second_per_source,
            );
            let max_flows = self.number(
                &format!("{path}.max_flows"),
                l.max_flows,
                MAX_FLOWS,
                DEFAULT_MAX_FLOWS,
            );
            let pool = match &l.pool {
                Some(pool) if pool_names.contains(pool.as_str()) => Some(pool.clone()),
                Some(pool) => {
                    self.error(format!("{path}.pool"), format!("no pool named {pool:?}"));
                    None
                }
                None => {
                    self.error(format!("{path}.pool"), "a listener needs a pool");
                    None
                }
            };
            let proxy_protocol = match l.proxy_protocol.as_deref().unwrap_or("off") {
                "off" => Some(ProxyProtocol::Off),
                "v1" => Some(ProxyProtocol::V1),
                "v2" => Some(ProxyProtocol::V2),
                other => {
                    self.error(
                        format!("{path}.proxy_protocol"),
                        format!("unknown value {other:?} (expected off, v1 or v2)"),
                    );
                    None
                }
            };
            let allow = self.networks(&format!("{path}.allow"), &l.allow);
            let deny = self.networks(&format!("{path}.deny"), &l.deny);
            let max_connections = self.number(
                &format!("{path}.max_connections"),
                l.max_connections,
                MAX_CONNECTIONS,
                DEFAULT_MAX_CONNECTIONS,
            );
            let retries = self.number(
                &format!("{path}.retries"),
                l.retries,
                RETRIES,
                default_retries,
            );
            let connect_timeout = self.duration_or(
                &format!("{path}.connect_timeout"),
                l.connect_timeout.as_ref(),
                CONNECT_TIMEOUT,
                default_connect,
            );
            // UDP flows are short-lived by nature: defaults.idle_timeout (sized for TCP
            // sessions) does not apply to them.
            let idle_timeout = self.duration_or(
                &format!("{path}.idle_timeout"),
                l.idle_timeout.as_ref(),
                IDLE_TIMEOUT,
                if is_udp {
                    DEFAULT_UDP_IDLE_TIMEOUT
                } else {
                    default_idle
                },
            );
            let relay = self
                .relay_mode(&format!("{path}.relay"), l.relay.as_deref())
                .unwrap_or(default_relay);
            if let (Some(bind), Some(protocol), Some(pool), Some(proxy_protocol)) =
                (bind, protocol, pool, proxy_protocol)
            {
                listeners.push(Listener {
                    name: l.name.clone(),
                    bind,
                    protocol,
                    pool,
                    proxy_protocol,
                    access: AccessList { allow, deny },
                    max_connections,
                    connect_timeout,
                    idle_timeout,
                    retries,
                    relay,
                    max_flows,
                    max_connections_per_source,
                    max_new_connections_per_second_per_source,
                    max_new_flows_per_second_per_source,
                    sni,
                    sni_timeout,
                    sni_postgres,
                    accept_proxy,
                    proxy_protocol_udp,
                    freebind: l.freebind.unwrap_or(false),
                });
            }
        }

        if self.errors.is_empty() {
            Ok(Config {
                workers,
                drain_timeout,
                shutdown_delay,
                max_pipes,
                admin,
                admin_token,
                access_log,
                listeners,
                pools,
            })
        } else {
            Err(ConfigErrors(self.errors))
        }
    }

    fn relay_mode(&mut self, path: &str, raw: Option<&str>) -> Option<RelayMode> {
        match raw? {
            "auto" => Some(RelayMode::Auto),
            "splice" => Some(RelayMode::Splice),
            "copy" => Some(RelayMode::Copy),
            other => {
                self.error(
                    path,
                    format!("unknown relay {other:?} (expected auto, splice or copy)"),
                );
                None
            }
        }
    }

    fn networks(&mut self, path: &str, raw: &[String]) -> Vec<IpNet> {
        let mut nets = Vec::new();
        for (i, text) in raw.iter().enumerate() {
            // A bare address means that one host.
            let parsed = text
                .parse::<IpNet>()
                .or_else(|_| text.parse::<std::net::IpAddr>().map(IpNet::from));
            match parsed {
                Ok(net) => nets.push(net),
                Err(_) => self.error(
                    format!("{path}[{i}]"),
                    format!("invalid network {text:?} (write e.g. 10.0.0.0/8)"),
                ),
            }
        }
        nets
    }

    fn health(&mut self, path: &str, raw: Option<&RawHealth>, udp_only: bool) -> HealthSettings {
        let mut defaults = HealthSettings::default();
        if udp_only {
            defaults.check = Check::UdpPort;
        }
        let Some(h) = raw else {
            return defaults;
        };
        let check = self.check(&format!("{path}.health"), h, udp_only);
        let rise = self.number(
            &format!("{path}.health.rise"),
            h.rise,
            RISE_FALL,
            defaults.rise,
        );
        let fall = self.number(
            &format!("{path}.health.fall"),
            h.fall,
            RISE_FALL,
            defaults.fall,
        );
        if h.port == Some(0) {
            self.error(format!("{path}.health.port"), "must be 1..=65535");
        }
        HealthSettings {
            interval: self.duration_or(
                &format!("{path}.health.interval"),
                h.interval.as_ref(),
                HEALTH_INTERVAL,
                defaults.interval,
            ),
            timeout: self.duration_or(
                &format!("{path}.health.timeout"),
                h.timeout.as_ref(),
                HEALTH_TIMEOUT,
                defaults.timeout,
            ),
            rise,
            fall,
            port: h.port,
            check,
            active: true,
        }
    }

    /// The check a `health:` section asks for: `check:` and the keys that go with it.
    fn check(&mut self, path: &str, h: &RawHealth, udp_only: bool) -> Check {
        let default_kind = if udp_only { "udp" } else { "tcp" };
        let kind = h.check.as_deref().unwrap_or(default_kind);
        // Which optional keys each kind takes; any other one set is an error.
        let takes: &[&str] = match kind {
            "send_expect" | "udp_send_expect" => &["send", "send_hex", "expect", "expect_regex"],
            "http" => &["http"],
            "dns" => &["dns_name"],
            _ => &[],
        };
        for (key, set) in [
            ("send", h.send.is_some()),
            ("send_hex", h.send_hex.is_some()),
            ("expect", h.expect.is_some()),
            ("expect_regex", h.expect_regex.is_some()),
            ("http", h.http.is_some()),
            ("dns_name", h.dns_name.is_some()),
        ] {
            if set && !takes.contains(&key) {
                self.error(
                    format!("{path}.{key}"),
                    format!("does not apply to check: {kind}"),
                );
            }
        }
        match kind {
            "tcp" => Check::TcpConnect,
            "udp" => Check::UdpPort,
            "send_expect" | "udp_send_expect" => {
                let send = self.check_payload(path, h);
                let expect = self.check_expect(path, h);
                if kind == "udp_send_expect" {
                    if send.is_empty() {
                        self.error(
                            format!("{path}.send"),
                            "udp_send_expect needs a datagram to send (send or send_hex)",
                        );
                    }
                    Check::Udp { send, expect }
                } else {
                    if send.is_empty() && expect == Expect::Anything {
                        self.error(
                            format!("{path}.check"),
                            "send_expect needs send, expect or both (a plain connect is check: tcp)",
                        );
                    }
                    Check::Tcp { send, expect }
                }
            }
            "http" => self.http_check(&format!("{path}.http"), h.http.as_ref()),
            "redis_primary" => Check::Tcp {
                send: b"INFO replication\r\n".to_vec(),
                expect: Expect::Contains(b"role:master".to_vec()),
            },
            "postgres" => Check::Tcp {
                send: l4_core::postgres::SSL_REQUEST.to_vec(),
                expect: Expect::FirstByte(b"SN".to_vec()),
            },
            "mysql" => Check::Tcp {
                send: Vec::new(),
                // A protocol 10 greeting: 3-byte length, sequence 0, version byte 10.
                expect: match regex::bytes::Regex::new(r"(?s-u)\A.{3}\x00\x0a") {
                    Ok(re) => Expect::Regex(re),
                    Err(_) => Expect::Anything,
                },
            },
            "dns" => {
                let name = h.dns_name.clone().unwrap_or_else(|| "localhost".into());
                if !is_dns_name(&name) {
                    self.error(
                        format!("{path}.dns_name"),
                        format!("{name:?} is not a DNS name"),
                    );
                }
                Check::Dns { name }
            }
            other => {
                self.error(
                    format!("{path}.check"),
                    format!("unknown check {other:?} (expected tcp, udp, send_expect, udp_send_expect, http, redis_primary, postgres, mysql or dns)"),
                );
                Check::TcpConnect
            }
        }
    }

    fn discovery(&mut self, path: &str, d: &RawDiscovery) -> Discovery {
        let kind = match d.kind.as_deref().unwrap_or("a") {
            "a" => DiscoveryKind::A,
            "aaaa" => DiscoveryKind::Aaaa,
            "srv" => DiscoveryKind::Srv,
            other => {
                self.error(
                    format!("{path}.type"),
                    format!("unknown type {other:?} (expected a, aaaa or srv)"),
                );
                DiscoveryKind::A
            }
        };
        let port = match (kind, d.port) {
            (DiscoveryKind::Srv, Some(_)) => {
                self.error(format!("{path}.port"), "SRV records carry their ports");
                0
            }
            (DiscoveryKind::Srv, None) => 0,
            (_, Some(0)) | (_, None) => {
                self.error(
                    format!("{path}.port"),
                    "A and AAAA discovery needs the backends' port (1..=65535)",
                );
                0
            }
            (_, Some(port)) => port,
        };
        let name = d.dns.trim_end_matches('.');
        if !is_dns_name(name) {
            self.error(
                format!("{path}.dns"),
                format!("{:?} is not a DNS name", d.dns),
            );
        }
        let resolver = d
            .resolver
            .as_ref()
            .and_then(|r| match r.parse::<SocketAddr>() {
                Ok(addr) => Some(addr),
                Err(_) => {
                    self.error(
                        format!("{path}.resolver"),
                        format!("invalid socket address {r:?} (write ip:port)"),
                    );
                    None
                }
            });
        let interval = self.duration_or(
            &format!("{path}.interval"),
            d.interval.as_ref(),
            DISCOVERY_INTERVAL,
            DEFAULT_DISCOVERY_INTERVAL,
        );
        Discovery {
            name: format!("{name}."),
            kind,
            port,
            interval,
            resolver,
        }
    }

    /// `send` (text; YAML's escapes give CR, LF and the like) or `send_hex` (bytes).
    fn check_payload(&mut self, path: &str, h: &RawHealth) -> Vec<u8> {
        let bytes = match (&h.send, &h.send_hex) {
            (Some(_), Some(_)) => {
                self.error(
                    format!("{path}.send_hex"),
                    "give send or send_hex, not both",
                );
                Vec::new()
            }
            (Some(text), None) => text.as_bytes().to_vec(),
            (None, Some(hex)) => {
                let digits: Vec<u8> = hex.bytes().filter(|b| !b.is_ascii_whitespace()).collect();
                let decoded: Option<Vec<u8>> = digits
                    .chunks(2)
                    .map(|pair| {
                        let text = std::str::from_utf8(pair).ok()?;
                        (pair.len() == 2).then_some(())?;
                        u8::from_str_radix(text, 16).ok()
                    })
                    .collect();
                decoded.unwrap_or_else(|| {
                    self.error(
                        format!("{path}.send_hex"),
                        "must be pairs of hex digits (spaces allowed)",
                    );
                    Vec::new()
                })
            }
            (None, None) => Vec::new(),
        };
        if bytes.len() > MAX_CHECK_BYTES {
            self.error(
                format!("{path}.send"),
                format!("{} bytes (at most {MAX_CHECK_BYTES})", bytes.len()),
            );
        }
        bytes
    }

    fn check_expect(&mut self, path: &str, h: &RawHealth) -> Expect {
        match (&h.expect, &h.expect_regex) {
            (Some(_), Some(_)) => {
                self.error(
                    format!("{path}.expect_regex"),
                    "give expect or expect_regex, not both",
                );
                Expect::Anything
            }
            (Some(text), None) if text.is_empty() || text.len() > MAX_CHECK_BYTES => {
                self.error(
                    format!("{path}.expect"),
                    format!("must be 1 to {MAX_CHECK_BYTES} bytes"),
                );
                Expect::Anything
            }
            (Some(text), None) => Expect::Contains(text.as_bytes().to_vec()),
            (None, Some(pattern)) => {
                match regex::bytes::RegexBuilder::new(pattern)
                    .size_limit(1 << 20)
                    .build()
                {
                    Ok(re) => Expect::Regex(re),
                    Err(e) => {
                        self.error(format!("{path}.expect_regex"), e.to_string());
                        Expect::Anything
                    }
                }
            }
            (None, None) => Expect::Anything,
        }
    }

    /// An HTTP check: a request on a fresh connection, judged by its status line.
    fn http_check(&mut self, path: &str, raw: Option<&RawHttpCheck>) -> Check {
        let method = raw
            .and_then(|r| r.method.clone())
            .unwrap_or_else(|| "GET".into());
        if method.is_empty() || method.len() > 16 || !method.bytes().all(|b| b.is_ascii_uppercase())
        {
            self.error(
                format!("{path}.method"),
                format!("{method:?} is not an HTTP method"),
            );
        }
        let target = raw
            .and_then(|r| r.path.clone())
            .unwrap_or_else(|| "/".into());
        if !target.starts_with('/')
            || target.len() > 1024
            || !target.bytes().all(|b| b.is_ascii_graphic())
        {
            self.error(
                format!("{path}.path"),
                format!("{target:?} is not a request path (starts with /, no spaces)"),
            );
        }
        let host = raw
            .and_then(|r| r.host.clone())
            .unwrap_or_else(|| "localhost".into());
        if host.is_empty() || host.len() > 255 || !host.bytes().all(|b| b.is_ascii_graphic()) {
            self.error(format!("{path}.host"), format!("{host:?} is not a host"));
        }
        let statuses: Vec<(u16, u16)> = match raw.map(|r| r.status.as_slice()) {
            Some(codes) if !codes.is_empty() => {
                for code in codes {
                    if !(100..=599).contains(code) {
                        self.error(
                            format!("{path}.status"),
                            format!("{code} is outside 100..=599"),
                        );
                    }
                }
                codes.iter().map(|&c| (c, c)).collect()
            }
            // As HAProxy's httpchk: any 2xx or 3xx.
            _ => vec![(200, 399)],
        };
        Check::Tcp {
            send: format!(
                "{method} {target} HTTP/1.0\r\nHost: {host}\r\nUser-Agent: l4lb-health\r\nConnection: close\r\n\r\n"
            )
            .into_bytes(),
            expect: Expect::HttpStatus(statuses),
        }
    }

    /// A listener or pool name: it appears in metric labels and admin URLs, so letters,
    /// digits, `.`, `_` and `-` only, 1 to 64 of them. Returns whether it is one.
    fn name(&mut self, path: &str, name: &str) -> bool {
        let ok = !name.is_empty()
            && name.len() <= 64
            && name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'));
        if !ok {
            self.error(
                path,
                format!("{name:?} is not a name: 1 to 64 letters, digits, '.', '_' or '-'"),
            );
        }
        ok
    }

    fn access_log(&mut self, raw: Option<&RawLog>) -> AccessLog {
        let Some(raw) = raw else {
            return AccessLog::default();
        };
        let sink = match raw.access.as_deref().map(str::trim) {
            None | Some("stderr") => AccessSink::Stderr,
            Some("off") => AccessSink::Off,
            Some("") => {
                self.error("log.access", "must be off, stderr or a file path");
                AccessSink::Stderr
            }
            Some(path) => AccessSink::File(std::path::PathBuf::from(path)),
        };
        let json = match raw.format.as_deref().unwrap_or("text") {
            "text" => false,
            "json" => true,
            other => {
                self.error(
                    "log.format",
                    format!("unknown format {other:?} (expected text or json)"),
                );
                false
            }
        };
        AccessLog { sink, json }
    }

    /// The pool's local source addresses: specific unicast addresses, and one of each
    /// family its backends use.
    fn sources(&mut self, path: &str, p: &RawPool) -> Vec<std::net::IpAddr> {
        let mut out = Vec::new();
        if p.source.len() > MAX_SOURCES {
            self.error(
                format!("{path}.source"),
                format!(
                    "{} addresses is above the maximum {MAX_SOURCES}",
                    p.source.len()
                ),
            );
        }
        for (i, text) in p.source.iter().enumerate() {
            match text.parse::<std::net::IpAddr>() {
                Ok(ip) if ip.is_unspecified() || ip.is_multicast() => self.error(
                    format!("{path}.source[{i}]"),
                    format!("{ip} is not a local unicast address"),
                ),
                Ok(ip) if out.contains(&ip) => self.error(
                    format!("{path}.source[{i}]"),
                    format!("{ip} is listed twice"),
                ),
                Ok(ip) => out.push(ip),
                Err(_) => self.error(
                    format!("{path}.source[{i}]"),
                    format!("invalid address {text:?} (write an IP address)"),
                ),
            }
        }
        if !out.is_empty() {
            for (j, b) in p.backends.iter().enumerate() {
                if let Ok(addr) = b.address.parse::<SocketAddr>() {
                    if !out.iter().any(|ip| ip.is_ipv4() == addr.is_ipv4()) {
                        let family = if addr.is_ipv4() { "IPv4" } else { "IPv6" };
                        self.error(
                            format!("{path}.backends[{j}].address"),
                            format!("{addr} is {family} but the pool has no {family} source"),
                        );
                    }
                }
            }
        }
        out
    }

    fn passive(&mut self, path: &str, raw: Option<&RawPassive>) -> OutlierSettings {
        let defaults = OutlierSettings::default();
        let Some(p) = raw else {
            return defaults;
        };
        let failures = self.number(
            &format!("{path}.passive.failures"),
            p.failures,
            PASSIVE_FAILURES,
            defaults.failures,
        );
        let max_ejection_percent = self.number(
            &format!("{path}.passive.max_ejection_percent"),
            p.max_ejection_percent,
            0..=100,
            u32::from(defaults.max_ejection_percent),
        ) as u8;
        let ejection_time = self.duration_or(
            &format!("{path}.passive.ejection_time"),
            p.ejection_time.as_ref(),
            EJECTION_TIME,
            defaults.ejection_time,
        );
        let max_ejection_time = self.duration_or(
            &format!("{path}.passive.max_ejection_time"),
            p.max_ejection_time.as_ref(),
            EJECTION_TIME,
            defaults.max_ejection_time.max(ejection_time),
        );
        if ejection_time > max_ejection_time {
            self.error(
                format!("{path}.passive.ejection_time"),
                format!(
                    "{} is longer than max_ejection_time ({})",
                    humantime::format_duration(ejection_time),
                    humantime::format_duration(max_ejection_time)
                ),
            );
        }
        OutlierSettings {
            failures,
            max_ejection_percent,
            ejection_time,
            max_ejection_time,
            empty_close_fails: p.empty_close_fails.unwrap_or(defaults.empty_close_fails),
        }
    }

    fn algorithm(&mut self, path: &str, p: &RawPool, udp_only: bool) -> Option<Algorithm> {
        let default = if udp_only { "maglev" } else { "round_robin" };
        let name = p.algorithm.as_deref().unwrap_or(default);
        let hashing = matches!(name, "source_hash" | "maglev");
        let hash = match p.hash.as_deref() {
            None => None,
            Some(_) if !hashing => {
                self.error(
                    format!("{path}.hash"),
                    format!("hash applies to source_hash and maglev, not {name}"),
                );
                None
            }
            Some("src_ip") => Some(HashKey::SrcIp),
            Some("src_ip_port") => Some(HashKey::SrcIpPort),
            Some("five_tuple") => Some(HashKey::FiveTuple),
            Some(other) => {
                self.error(
                    format!("{path}.hash"),
                    format!(
                        "unknown hash key {other:?} (expected src_ip, src_ip_port or five_tuple)"
                    ),
                );
                None
            }
        };
        if p.table_size.is_some() && name != "maglev" {
            self.error(
                format!("{path}.table_size"),
                format!("table_size applies to maglev, not {name}"),
            );
        }
        if p.least_time.is_some() && name != "least_time" {
            self.error(
                format!("{path}.least_time"),
                format!("least_time applies to the least_time algorithm, not {name}"),
            );
        }
        match name {
            "round_robin" => Some(Algorithm::RoundRobin),
            "least_conn" => Some(Algorithm::LeastConn),
            "p2c" => Some(Algorithm::PowerOfTwo),
            "least_time" => match p.least_time.as_deref().unwrap_or("connect") {
                "connect" => Some(Algorithm::LeastTime(TimeMetric::Connect)),
                "first_byte" => Some(Algorithm::LeastTime(TimeMetric::FirstByte)),
                other => {
                    self.error(
                        format!("{path}.least_time"),
                        format!("unknown measure {other:?} (expected connect or first_byte)"),
                    );
                    None
                }
            },
            "source_hash" => Some(Algorithm::SourceHash(hash.unwrap_or(HashKey::SrcIp))),
            "maglev" => {
                let table_size = p.table_size.unwrap_or(DEFAULT_TABLE_SIZE);
                if !TABLE_SIZE.contains(&table_size) {
                    self.error(
                        format!("{path}.table_size"),
                        format!(
                            "{table_size} is outside {}..={} (a prime: 65537 or 655373 are good)",
                            TABLE_SIZE.start(),
                            TABLE_SIZE.end()
                        ),
                    );
                } else if !is_prime(table_size) {
                    self.error(
                        format!("{path}.table_size"),
                        format!("{table_size} is not prime (try 65537 or 655373)"),
                    );
                } else if (table_size as usize) < p.backends.len().max(1) * 10 {
                    self.error(format!("{path}.table_size"), format!("{table_size} is too small for {} backends (at least 10 slots per backend; 100 keeps shares within 1%)", p.backends.len()));
                }
                Some(Algorithm::Maglev {
                    key: hash.unwrap_or(HashKey::FiveTuple),
                    table_size,
                })
            }
            other => {
                self.error(format!("{path}.algorithm"), format!("unknown algorithm {other:?} (expected round_robin, least_conn, p2c, least_time, source_hash or maglev)"));
                None
            }
        }
    }

    fn pools(
        &mut self,
        raw: &[RawPool],
        udp_pools: &HashSet<&str>,
        tcp_pools: &HashSet<&str>,
    ) -> Vec<PoolConfig> {
        let mut names = HashSet::new();
        let mut pools = Vec::new();
        for (i, p) in raw.iter().enumerate() {
            let path = format!("pools[{i}]");
            if !self.name(&format!("{path}.name"), &p.name) {
            } else if !names.insert(p.name.as_str()) {
                self.error(
                    format!("{path}.name"),
                    format!("duplicate pool name {:?}", p.name),
                );
            }
            // UDP-only pools default to maglev on the 5-tuple and probe with datagrams.
            let udp_only =
                udp_pools.contains(p.name.as_str()) && !tcp_pools.contains(p.name.as_str());
            let algorithm = self.algorithm(&path, p, udp_only);
            let health = self.health(&path, p.health.as_ref(), udp_only);
            let passive = self.passive(&path, p.passive.as_ref());
            let discovery = p
                .discovery
                .as_ref()
                .map(|d| self.discovery(&format!("{path}.discovery"), d));
            if discovery.is_some() && !p.backends.is_empty() {
                self.error(
                    format!("{path}.backends"),
                    "a pool takes its backends from discovery or from backends, not both",
                );
            } else if p.backends.is_empty() && discovery.is_none() {
                self.error(
                    format!("{path}.backends"),
                    "a pool needs at least one backend",
                );
            } else if p.backends.len() > MAX_BACKENDS {
                self.error(
                    format!("{path}.backends"),
                    format!(
                        "{} backends is above the maximum {MAX_BACKENDS} per pool",
                        p.backends.len()
                    ),
                );
            }
            let source = self.sources(&path, p);
            let mut seen = HashSet::new();
            let mut backends = Vec::new();
            for (j, b) in p.backends.iter().enumerate() {
                let bpath = format!("{path}.backends[{j}]");
                let addr = match b.address.parse::<SocketAddr>() {
                    Ok(addr) => {
                        if !seen.insert(addr) {
                            self.error(
                                format!("{bpath}.address"),
                                format!("{addr} is listed twice in this pool"),
                            );
                        }
                        Some(addr)
                    }
                    Err(_) => {
                        self.error(
                            format!("{bpath}.address"),
                            format!(
                                "invalid socket address {:?} (write ip:port, [ipv6]:port)",
                                b.address
                            ),
                        );
                        None
                    }
                };
                let weight = b.weight.unwrap_or(1);
                if weight == 0 || weight > MAX_WEIGHT {
                    self.error(
                        format!("{bpath}.weight"),
                        format!("{weight} is outside 1..={MAX_WEIGHT}"),
                    );
                }
                if let Some(addr) = addr {
                    backends.push(BackendSpec {
                        addr,
                        weight: weight.clamp(1, MAX_WEIGHT),
                        backup: b.backup,
                    });
                }
            }
            if let Some(algorithm) = algorithm {
                let on_down = match p.on_down.as_deref() {
                    None | Some("keep") => OnDown::Keep,
                    Some("close") => OnDown::Close,
                    Some(other) => {
                        self.error(
                            format!("{path}.on_down"),
                            format!("unknown value {other:?} (expected keep or close)"),
                        );
                        OnDown::Keep
                    }
                };
                if on_down == OnDown::Close && udp_only {
                    self.error(
                        format!("{path}.on_down"),
                        "close applies to TCP connections; UDP flows already move off a down backend on their next datagram",
                    );
                }
                if p.close_after.is_some() && on_down != OnDown::Close {
                    self.error(format!("{path}.close_after"), "applies with on_down: close");
                }
                let close_after = self.duration_or(
                    &format!("{path}.close_after"),
                    p.close_after.as_ref(),
                    CLOSE_AFTER,
                    Duration::ZERO,
                );
                let slow_start = self.duration_or(
                    &format!("{path}.slow_start"),
                    p.slow_start.as_ref(),
                    SLOW_START,
                    Duration::ZERO,
                );
                if !slow_start.is_zero() && algorithm.is_hashing() {
                    self.error(
                        format!("{path}.slow_start"),
                        format!(
                            "does not apply to {} (placement by hash must not move clients during the ramp)",
                            algorithm.as_str()
                        ),
                    );
                }
                pools.push(PoolConfig {
                    name: p.name.clone(),
                    algorithm,
                    health,
                    passive,
                    discovery,
                    on_down,
                    slow_start,
                    close_after,
                    backends,
                    source,
                });
            }
        }
        pools
    }
}

/// A DNS name l4lb may ask for: labels of letters, digits, `-` and `_`, 1 to 63 bytes
/// each, 253 at most in all (a trailing dot allowed).
fn is_dns_name(name: &str) -> bool {
    let name = name.trim_end_matches('.');
    !name.is_empty()
        && name.len() <= 253
        && name.split('.').all(|l| {
            !l.is_empty()
                && l.len() <= 63
                && l.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
workers: 2
drain_timeout: 5s
defaults: { connect_timeout: 1s, idle_timeout: 10m, retries: 1 }
listeners:
  - { name: web, bind: "127.0.0.1:8080", pool: web, proxy_protocol: v2, allow: [127.0.0.0/8, "::1"] }
pools:
  - name: web
    backends:
      - { address: "127.0.0.1:8081", weight: 2 }
      - { address: "127.0.0.1:8082", backup: true }
"#;

    fn errors(text: &str) -> Vec<String> {
        parse(text)
            .unwrap_err()
            .0
            .iter()
            .map(|e| e.to_string())
            .collect()
    }

    #[test]
    fn a_good_config_parses_with_defaults_applied() {
        let c = parse(GOOD).unwrap();
        assert_eq!(c.workers, 2);
        assert_eq!(c.drain_timeout, Duration::from_secs(5));
        let l = &c.listeners[0];
        assert_eq!(l.connect_timeout, Duration::from_secs(1));
        assert_eq!(l.retries, 1);
        assert_eq!(l.proxy_protocol, ProxyProtocol::V2);
        assert_eq!(l.access.allow.len(), 2);
        assert_eq!(c.pools[0].backends[0].weight, 2);
        assert!(c.pools[0].backends[1].backup);
    }

    #[test]
    fn every_error_is_reported_with_its_path() {
        let e = errors(
            r#"
listeners:
  - { name: a, bind: "nope", pool: missing }
  - { name: a, bind: "127.0.0.1:1", pool: p, connect_timeout: 0s, idle_timeout: soon }
pools:
  - { name: p, backends: [ { address: "10.0.0.1" }, { address: "10.0.0.2:80", weight: 0 } ] }
  - { name: p, backends: [] }
"#,
        );
        let expected = [
            "listeners[0].bind: invalid socket address \"nope\"",
            "listeners[0].pool: no pool named \"missing\"",
            "listeners[1].name: duplicate listener name \"a\"",
            "listeners[1].connect_timeout: must be greater than zero",
            "listeners[1].idle_timeout: invalid duration \"soon\"",
            "pools[0].backends[0].address: invalid socket address \"10.0.0.1\"",
            "pools[0].backends[1].weight: 0 is outside 1..=256",
            "pools[1].name: duplicate pool name \"p\"",
            "pools[1].backends: a pool needs at least one backend",
        ];
        for want in expected {
            assert!(
                e.iter().any(|got| got.starts_with(want)),
                "missing {want:?} in {e:#?}"
            );
        }
    }

    #[test]
    fn passive_settings_have_ranges() {
        let text = GOOD.replace(
            "  - name: web\n",
            "  - name: web\n    passive: { failures: 0, max_ejection_percent: 101, ejection_time: 2m, max_ejection_time: 1m }\n",
        );
        let errs = errors(&text);
        for want in [
            "pools[0].passive.failures: 0 is outside 1..=1000",
            "pools[0].passive.max_ejection_percent: 101 is outside 0..=100",
            "pools[0].passive.ejection_time: 2m is longer than max_ejection_time (1m)",
        ] {
            assert!(errs.iter().any(|e| e == want), "{want} not in {errs:?}");
        }
        let ok = GOOD.replace(
            "  - name: web\n",
            "  - name: web\n    passive: { failures: 5, max_ejection_percent: 0, ejection_time: 500ms }\n",
        );
        let config = parse(&ok).unwrap();
        let p = config.pools[0].passive;
        assert_eq!((p.failures, p.max_ejection_percent), (5, 0));
        assert_eq!(p.ejection_time, Duration::from_millis(500));
    }

    #[test]
    fn unknown_keys_are_rejected_with_a_line() {
        let e =
            errors("listeners:\n  - name: a\n    bind: 127.0.0.1:1\n    pool: p\n    bnid: x\n");
        assert!(e[0].contains("unknown field `bnid`"), "{e:?}");
        assert!(e[0].contains("line 5"), "{e:?}");
    }

    #[test]
    fn bare_numbers_as_durations_are_explained() {
        let text = GOOD.replace("connect_timeout: 1s", "connect_timeout: 3");
        let e = errors(&text);
        assert_eq!(
            e,
            vec!["defaults.connect_timeout: duration 3 has no unit (write e.g. 3s or 3ms)"]
        );
    }

    #[test]
    fn edge_settings_parse_and_their_misuse_is_explained() {
        let ok = GOOD.replace(
            "proxy_protocol: v2, ",
            "proxy_protocol: v2, accept_proxy: { from: [127.0.0.3] }, sni_postgres: true, sni_timeout: 2s, sni: [ { match: DB1.test., pool: web }, { match: \"*.test\", pool: web } ], ",
        );
        let config = parse(&ok).unwrap();
        let l = &config.listeners[0];
        assert_eq!(l.sni.len(), 2);
        assert!(l.sni_postgres);
        assert_eq!(l.sni_timeout, Duration::from_secs(2));
        let accept = l.accept_proxy.as_ref().unwrap();
        assert_eq!(accept.from.len(), 1);
        assert_eq!(accept.timeout, DEFAULT_ACCEPT_PROXY_TIMEOUT);
        // A pool that a UDP listener uses and a TCP listener routes to by SNI is checked
        // and balanced as a TCP pool.
        let shared = r#"
listeners:
  - { name: t, bind: "127.0.0.1:1", pool: a, sni: [ { match: b.test, pool: b } ] }
  - { name: u, bind: "127.0.0.1:2", protocol: udp, pool: b }
pools:
  - { name: a, backends: [ { address: "127.0.0.1:9" } ] }
  - { name: b, backends: [ { address: "127.0.0.1:10" } ] }
"#;
        let config = parse(shared).unwrap();
        assert_eq!(
            config.pools[1].algorithm,
            parse(shared).unwrap().pools[0].algorithm
        );

        let bad = r#"
listeners:
  - { name: t, bind: "127.0.0.1:1", pool: p, sni: [ { match: "a.test", pool: p }, { match: "A.TEST", pool: p }, { match: "x.*.test", pool: nope } ] }
  - { name: u, bind: "127.0.0.1:2", pool: p, sni_postgres: true, sni_timeout: 1s, accept_proxy: { from: [] } }
  - { name: v, bind: "127.0.0.1:3", protocol: udp, pool: p, proxy_protocol: v1, sni: [], accept_proxy: { from: [10.0.0.0/8], timeout: 1s } }
  - { name: w, bind: "127.0.0.1:4", pool: p, proxy_protocol_udp: every }
pools:
  - { name: p, backends: [ { address: "127.0.0.1:9" } ] }
"#;
        let errs = errors(bad);
        for want in [
            "listeners[0].sni[1].match: \"A.TEST\" is routed twice",
            "listeners[0].sni[2].pool: no pool named \"nope\"",
            "listeners[0].sni[2].match: \"x.*.test\" is not a host name",
            "listeners[1].sni_postgres: needs sni routes to choose among",
            "listeners[1].sni_timeout: applies only with sni routes",
            "listeners[1].accept_proxy.from: list the upstream balancers",
            "listeners[2].proxy_protocol: v1 has no UDP form",
            "listeners[2].sni: applies to tcp listeners only",
            "listeners[2].accept_proxy.timeout: applies to tcp listeners only",
            "listeners[3].proxy_protocol_udp: applies to udp listeners with proxy_protocol: v2",
        ] {
            assert!(
                errs.iter().any(|e| e.starts_with(want)),
                "{want} not in {errs:#?}"
            );
        }
    }

    #[test]
    fn health_checks_parse_and_their_misuse_is_explained() {
        let with = |health: &str| {
            GOOD.replace(
                "  - name: web\n",
                &format!("  - name: web\n    health: {health}\n"),
            )
        };
        let check = |health: &str| parse(&with(health)).unwrap().pools[0].health.check.clone();
        assert_eq!(check("{ interval: 1s }"), Check::TcpConnect);
        assert!(matches!(
            check(r#"{ check: send_expect, send: "PING\r\n", expect: "+PONG" }"#),
            Check::Tcp { send, expect: Expect::Contains(e) } if send == b"PING\r\n" && e == b"+PONG"
        ));
        assert!(matches!(
            check(r#"{ check: udp_send_expect, send_hex: "00 01 ff", expect_regex: "^ok" }"#),
            Check::Udp { send, expect: Expect::Regex(_) } if send == [0, 1, 255]
        ));
        assert!(matches!(
            check("{ check: http, http: { path: /primary, status: [200] }, port: 8008 }"),
            Check::Tcp { send, expect: Expect::HttpStatus(s) }
                if send.starts_with(b"GET /primary HTTP/1.0\r\n") && s == vec![(200, 200)]
        ));
        assert!(
            matches!(check("{ check: dns, dns_name: example.com }"), Check::Dns { name } if name == "example.com")
        );
        assert!(matches!(
            check("{ check: postgres }"),
            Check::Tcp {
                expect: Expect::FirstByte(_),
                ..
            }
        ));
        for (health, want) in [
            ("{ check: ping }", "health.check: unknown check \"ping\""),
            (
                "{ check: tcp, send: x }",
                "health.send: does not apply to check: tcp",
            ),
            (
                "{ check: send_expect }",
                "health.check: send_expect needs send, expect or both",
            ),
            (
                "{ check: udp_send_expect, expect: x }",
                "health.send: udp_send_expect needs a datagram",
            ),
            (
                "{ check: send_expect, send_hex: abc }",
                "health.send_hex: must be pairs of hex digits",
            ),
            (
                "{ check: send_expect, expect_regex: \"(\" }",
                "health.expect_regex: regex parse error",
            ),
            (
                "{ check: http, http: { path: primary, status: [600] } }",
                "health.http.path: \"primary\" is not a request path",
            ),
            (
                "{ check: http, http: { status: [600] } }",
                "health.http.status: 600 is outside 100..=599",
            ),
            (
                "{ check: dns, dns_name: \"a..b\" }",
                "health.dns_name: \"a..b\" is not a DNS name",
            ),
        ] {
            let errs = errors(&with(health));
            assert!(
                errs.iter()
                    .any(|e| e.starts_with(&format!("pools[0].{want}"))),
                "{health}: {errs:#?}"
            );
        }
    }

    #[test]
    fn on_down_and_slow_start_have_values_and_ranges() {
        let with =
            |extra: &str| GOOD.replace("  - name: web\n", &format!("  - name: web\n    {extra}\n"));
        let config = parse(&with(
            "on_down: close\n    close_after: 5s\n    slow_start: 30s",
        ))
        .unwrap();
        let p = &config.pools[0];
        assert_eq!(p.on_down, OnDown::Close);
        assert_eq!(p.close_after, Duration::from_secs(5));
        assert_eq!(p.slow_start, Duration::from_secs(30));
        for (extra, want) in [
            ("on_down: kill", "pools[0].on_down: unknown value \"kill\""),
            (
                "close_after: 1s",
                "pools[0].close_after: applies with on_down: close",
            ),
            (
                "slow_start: 2h",
                "pools[0].slow_start: 2h is above the maximum 1h",
            ),
            (
                "algorithm: maglev\n    slow_start: 10s",
                "pools[0].slow_start: does not apply to maglev",
            ),
        ] {
            let errs = errors(&with(extra));
            assert!(
                errs.iter().any(|e| e.starts_with(want)),
                "{extra}: {errs:#?}"
            );
        }
    }

    #[test]
    fn discovery_replaces_backends_and_its_misuse_is_explained() {
        let text = "listeners:\n  - { name: t, bind: \"127.0.0.1:1\", pool: p }\npools:\n  - name: p\n    discovery: { dns: db.service.consul, type: srv, resolver: \"127.0.0.1:8600\" }\n";
        let config = parse(text).unwrap();
        let d = config.pools[0].discovery.clone().unwrap();
        assert_eq!(d.name, "db.service.consul.");
        assert_eq!(d.kind, DiscoveryKind::Srv);
        assert_eq!(d.interval, DEFAULT_DISCOVERY_INTERVAL);
        assert_eq!(d.resolver, Some("127.0.0.1:8600".parse().unwrap()));
        assert!(config.pools[0].backends.is_empty());
        for (pool, want) in [
            ("discovery: { dns: db.test, type: a }\n    backends: [ { address: \"127.0.0.1:9\" } ]", "pools[0].backends: a pool takes its backends from discovery or from backends"),
            ("discovery: { dns: db.test, type: a }", "pools[0].discovery.port: A and AAAA discovery needs the backends' port"),
            ("discovery: { dns: db.test, type: srv, port: 5 }", "pools[0].discovery.port: SRV records carry their ports"),
            ("discovery: { dns: \"a..b\", type: a, port: 5 }", "pools[0].discovery.dns: \"a..b\" is not a DNS name"),
            ("discovery: { dns: db.test, type: mx, port: 5 }", "pools[0].discovery.type: unknown type \"mx\""),
            ("discovery: { dns: db.test, port: 5, resolver: nope }", "pools[0].discovery.resolver: invalid socket address"),
        ] {
            let text = format!("listeners:\n  - {{ name: t, bind: \"127.0.0.1:1\", pool: p }}\npools:\n  - name: p\n    {pool}\n");
            let errs = errors(&text);
            assert!(errs.iter().any(|e| e.starts_with(want)), "{pool}: {errs:#?}");
        }
    }
}
