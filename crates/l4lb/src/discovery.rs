//! DNS service discovery for a pool (`discovery:`): resolve A, AAAA or SRV records at the
//! pool's interval (sooner when the answer's TTL ends first) and hand each changed set of
//! backends to the control loop, which applies it like a reload of that pool. A resolver
//! failure or an empty answer keeps the last good set (said once, and once when it is
//! over): losing a whole pool because the registry blinked is worse than a stale list.

use std::net::SocketAddr;
use std::time::Duration;

use hickory_resolver::config::{NameServerConfigGroup, ResolveHosts, ResolverConfig};
use hickory_resolver::name_server::TokioConnectionProvider;
use hickory_resolver::proto::rr::RecordType;
use hickory_resolver::{ResolveError, TokioResolver};
use l4_balance::BackendSpec;
use tokio::sync::mpsc::UnboundedSender;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::config::{Discovery, DiscoveryKind};

/// A pool's newly discovered backends, for the control loop.
#[derive(Debug)]
pub(crate) struct Discovered {
    pub(crate) pool: String,
    /// The settings the answer was found with: an answer queued by a task that a reload
    /// has since replaced is dropped.
    pub(crate) settings: Discovery,
    pub(crate) backends: Vec<BackendSpec>,
}

/// Resolves for `pool` until `stop`, sending each changed set on `tx`.
pub(crate) fn spawn(
    pool: String,
    settings: Discovery,
    tx: UnboundedSender<Discovered>,
    stop: CancellationToken,
) {
    tokio::spawn(async move {
        tokio::select! {
            () = stop.cancelled() => {}
            () = run(pool, settings, tx) => {}
        }
    });
}

fn resolver(settings: &Discovery) -> Result<TokioResolver, ResolveError> {
    let mut builder = match settings.resolver {
        Some(server) => TokioResolver::builder_with_config(
            ResolverConfig::from_parts(
                None,
                Vec::new(),
                NameServerConfigGroup::from_ips_clear(&[server.ip()], server.port(), true),
            ),
            TokioConnectionProvider::default(),
        ),
        None => TokioResolver::builder_tokio()?,
    };
    let opts = builder.options_mut();
    // Every round asks the server: the interval and the TTL decide, not a cache.
    opts.cache_size = 0;
    opts.use_hosts_file = ResolveHosts::Never;
    opts.timeout = Duration::from_secs(2);
    opts.attempts = 2;
    Ok(builder.build())
}

async fn run(pool: String, settings: Discovery, tx: UnboundedSender<Discovered>) {
    let resolver = match resolver(&settings) {
        Ok(r) => r,
        Err(e) => {
            warn!(pool = %pool, error = %e, "discovery: no resolver configuration; the pool stays empty");
            return;
        }
    };
    let mut last: Option<Vec<BackendSpec>> = None;
    let mut failing = false;
    loop {
        let wait = match resolve(&resolver, &settings).await {
            Ok((backends, ttl)) if !backends.is_empty() => {
                if failing {
                    info!(pool = %pool, name = %settings.name, "discovery answers again");
                    failing = false;
                }
                if last.as_ref() != Some(&backends) {
                    last = Some(backends.clone());
                    if tx
                        .send(Discovered {
                            pool: pool.clone(),
                            settings: settings.clone(),
                            backends,
                        })
                        .is_err()
                    {
                        return;
                    }
                }
                // Sooner than the interval when the records expire first; a TTL under a
                // second (Consul's and dnsmasq's default is 0) is no hint.
                match ttl {
                    Some(ttl) if ttl >= Duration::from_secs(1) => ttl.min(settings.interval),
                    _ => settings.interval,
                }
            }
            outcome => {
                if !failing {
                    let why = match outcome {
                        Ok(_) => "an empty answer".to_string(),
                        Err(e) => e.to_string(),
                    };
                    warn!(pool = %pool, name = %settings.name, error = %why, kept = last.as_ref().map_or(0, Vec::len), "discovery failed: keeping the last good set of backends");
                    failing = true;
                }
                settings.interval
            }
        };
        tokio::time::sleep(wait).await;
    }
}

/// One resolution: the backends, sorted by address, and how long the answer is valid.
async fn resolve(
    resolver: &TokioResolver,
    settings: &Discovery,
) -> Result<(Vec<BackendSpec>, Option<Duration>), ResolveError> {
    let now = std::time::Instant::now();
    let (mut backends, valid_until) = match settings.kind {
        DiscoveryKind::A | DiscoveryKind::Aaaa => {
            let kind = if settings.kind == DiscoveryKind::A {
                RecordType::A
            } else {
                RecordType::AAAA
            };
            let answer = resolver.lookup(settings.name.as_str(), kind).await?;
            let backends = answer
                .iter()
                .filter_map(|data| data.ip_addr())
                .map(|ip| spec(SocketAddr::new(ip, settings.port), 1, false))
                .collect();
            (backends, answer.valid_until())
        }
        DiscoveryKind::Srv => {
            let answer = resolver.srv_lookup(settings.name.as_str()).await?;
            // The lowest priority serves; higher ones are backups, as SRV means them.
            let best = answer.iter().map(|srv| srv.priority()).min().unwrap_or(0);
            let mut backends = Vec::new();
            for srv in answer.iter() {
                // "." means no service here (RFC 2782); a target that does not resolve
                // is skipped, not a reason to drop the whole answer.
                if srv.target().is_root() {
                    continue;
                }
                let ips = match resolver.lookup_ip(srv.target().clone()).await {
                    Ok(ips) => ips,
                    Err(e) => {
                        warn!(target = %srv.target(), error = %e, "discovery: SRV target does not resolve; skipped");
                        continue;
                    }
                };
                for ip in ips.iter() {
                    // SRV weights are 0..=65535; l4lb's 1..=256 (0 still gets a share).
                    let weight = u32::from(srv.weight()).clamp(1, l4_balance::MAX_WEIGHT);
                    backends.push(spec(
                        SocketAddr::new(ip, srv.port()),
                        weight,
                        srv.priority() > best,
                    ));
                }
            }
            (backends, answer.as_lookup().valid_until())
        }
    };
    // One entry per address, a primary winning over a backup whatever the answer's order.
    backends.sort_by_key(|b| (b.addr, b.backup));
    backends.dedup_by_key(|b| b.addr);
    backends.truncate(crate::config::MAX_BACKENDS);
    let ttl = valid_until.checked_duration_since(now);
    Ok((backends, ttl))
}

fn spec(addr: SocketAddr, weight: u32, backup: bool) -> BackendSpec {
    BackendSpec {
        addr,
        weight,
        backup,
    }
}
