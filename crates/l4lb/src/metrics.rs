//! `/metrics`: Prometheus metrics computed at scrape time from the counters the data path
//! already keeps (per-listener and per-backend atomics), so metrics cost the data path
//! nothing: no lock, no allocation per connection. Label sets are bounded by the config
//! (listener, pool, backend, and fixed reason/direction/state names).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use l4_balance::{FailureReason, Health, CONNECT_BUCKETS};
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, NoLabelSet};
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::Registry;

use crate::runtime::control::{Control, Service};

/// The registry behind `/metrics`.
pub(crate) fn registry(control: Arc<Mutex<Control>>) -> Registry {
    let mut registry = Registry::default();
    registry.register_collector(Box::new(L4lbCollector { control }));
    registry
}

/// The OpenMetrics content type.
pub(crate) const OPENMETRICS: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";
/// The classic Prometheus text format's content type.
pub(crate) const PROMETHEUS_TEXT: &str = "text/plain; version=0.0.4; charset=utf-8";

/// Renders the registry: OpenMetrics when the scraper asks for it (Prometheus does), else
/// the classic text format (promtool, curl, older scrapers).
pub(crate) fn render(registry: &Registry, openmetrics: bool) -> String {
    let mut out = String::new();
    // Writing to a String cannot fail.
    let _ = prometheus_client::encoding::text::encode(&mut out, registry);
    if openmetrics {
        out
    } else {
        to_prometheus_text(&out)
    }
}

/// OpenMetrics names a counter family without `_total` and its samples with it; the
/// classic format names both with it, and has no `# EOF` or `# UNIT`.
fn to_prometheus_text(openmetrics: &str) -> String {
    let counters: std::collections::HashSet<&str> = openmetrics
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|rest| rest.strip_suffix(" counter"))
        .collect();
    let mut out = String::with_capacity(openmetrics.len() + 64 * counters.len());
    for line in openmetrics.lines() {
        if line == "# EOF" || line.starts_with("# UNIT ") {
            continue;
        }
        let renamed = ["# HELP ", "# TYPE "].iter().find_map(|prefix| {
            let rest = line.strip_prefix(prefix)?;
            let (name, tail) = rest.split_once(' ')?;
            counters
                .contains(name)
                .then(|| format!("{prefix}{name}_total {tail}"))
        });
        match renamed {
            Some(line) => out.push_str(&line),
            None => out.push_str(line),
        }
        out.push('\n');
    }
    out
}

struct L4lbCollector {
    control: Arc<Mutex<Control>>,
}

impl std::fmt::Debug for L4lbCollector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("L4lbCollector")
    }
}

fn get(counter: &AtomicU64) -> u64 {
    counter.load(Ordering::Relaxed)
}

type Labels = Vec<(&'static str, String)>;

/// Samples per listener: `values` gives each listener's (label value, value) pairs; with
/// an empty `label` there is one pair and no extra label.
fn by_listener<S>(
    list: &[(String, Arc<S>)],
    label: &'static str,
    values: impl Fn(&S) -> Vec<(&'static str, u64)>,
) -> Vec<(Labels, u64)> {
    list.iter()
        .flat_map(|(name, service)| {
            values(service).into_iter().map(move |(key, value)| {
                let mut labels = vec![("listener", name.clone())];
                if !label.is_empty() {
                    labels.push((label, key.to_string()));
                }
                (labels, value)
            })
        })
        .collect()
}

/// One metric family: a descriptor and its samples, each a label set and a value.
fn family<L: prometheus_client::encoding::EncodeLabelSet>(
    encoder: &mut DescriptorEncoder<'_>,
    name: &str,
    help: &str,
    kind: MetricType,
    samples: &[(L, u64)],
) -> Result<(), std::fmt::Error> {
    let mut metric = encoder.encode_descriptor(name, help, None, kind)?;
    for (labels, value) in samples {
        let mut sample = metric.encode_family(labels)?;
        match kind {
            MetricType::Counter => sample.encode_counter::<NoLabelSet, u64, u64>(value, None)?,
            _ => sample.encode_gauge(&(*value as i64))?,
        }
    }
    Ok(())
}

impl Collector for L4lbCollector {
    fn encode(&self, mut encoder: DescriptorEncoder<'_>) -> Result<(), std::fmt::Error> {
        let control = self.control.lock().unwrap_or_else(|e| e.into_inner());
        let e = &mut encoder;
        let tcp: Vec<(String, Arc<l4_core::tcp::TcpService>)> = control
            .listeners
            .iter()
            .filter_map(|(name, l)| match &l.service {
                Service::Tcp(s) => Some((name.clone(), s.load_full())),
                Service::Udp(_) => None,
            })
            .collect();
        let udp: Vec<(String, Arc<l4_core::udp::UdpService>)> = control
            .listeners
            .iter()
            .filter_map(|(name, l)| match &l.service {
                Service::Udp(s) => Some((name.clone(), s.load_full())),
                Service::Tcp(_) => None,
            })
            .collect();
        let one = |v: u64| vec![("", v)];
        let in_out = |i: &AtomicU64, o: &AtomicU64| vec![("in", get(i)), ("out", get(o))];
        let counter = MetricType::Counter;
        let gauge = MetricType::Gauge;

        family(
            e,
            "l4lb_listener_connections",
            "TCP connections accepted.",
            counter,
            &by_listener(&tcp, "", |s| one(get(&s.stats.accepted))),
        )?;
        family(
            e,
            "l4lb_listener_connections_active",
            "TCP connections open now.",
            gauge,
            &by_listener(&tcp, "", |s| one(s.limit.active() as u64)),
        )?;
        family(
            e,
            "l4lb_listener_rejected",
            "TCP connections refused or closed without a backend, by reason.",
            counter,
            &by_listener(&tcp, "reason", |s| {
                vec![
                    ("denied", get(&s.stats.rejected_denied)),
                    ("max_connections", get(&s.stats.rejected_limit)),
                    ("no_backend", get(&s.stats.rejected_no_backend)),
                    ("per_source", get(&s.stats.rejected_per_source)),
                    ("per_source_rate", get(&s.stats.rejected_per_source_rate)),
                    ("untrusted", get(&s.stats.rejected_untrusted)),
                    ("proxy_header", get(&s.stats.rejected_proxy_header)),
                    ("preread", get(&s.stats.rejected_preread)),
                ]
            }),
        )?;
        family(
            e,
            "l4lb_listener_sni_routed",
            "TCP connections of SNI listeners: by a route (matched) or to the listener's pool (default).",
            counter,
            &by_listener(&tcp, "route", |s| {
                vec![
                    ("matched", get(&s.stats.sni_matched)),
                    ("default", get(&s.stats.sni_default)),
                ]
            }),
        )?;
        let mut bytes = by_listener(&tcp, "direction", |s| {
            in_out(&s.stats.bytes_in, &s.stats.bytes_out)
        });
        bytes.extend(by_listener(&udp, "direction", |s| {
            in_out(&s.stats.bytes_in, &s.stats.bytes_out)
        }));
        family(
            e,
            "l4lb_bytes",
            "Bytes relayed: in = client to backend, out = backend to client.",
            counter,
            &bytes,
        )?;
        family(
            e,
            "l4lb_spliced_bytes",
            "Bytes (both ways) moved by splice, never through user space.",
            counter,
            &by_listener(&tcp, "", |s| one(get(&s.stats.spliced_bytes))),
        )?;

        // UDP.
        family(
            e,
            "l4lb_udp_flows_active",
            "UDP flows now.",
            gauge,
            &by_listener(&udp, "", |s| one(get(&s.stats.flows_active))),
        )?;
        family(
            e,
            "l4lb_udp_flows",
            "UDP flows created.",
            counter,
            &by_listener(&udp, "", |s| one(get(&s.stats.flows_created))),
        )?;
        family(
            e,
            "l4lb_udp_flows_evicted",
            "UDP flows evicted (max_flows, or out of descriptors).",
            counter,
            &by_listener(&udp, "", |s| one(get(&s.stats.flows_evicted))),
        )?;
        family(
            e,
            "l4lb_udp_datagrams",
            "UDP datagrams relayed: in = client to backend, out = backend to client.",
            counter,
            &by_listener(&udp, "direction", |s| {
                in_out(&s.stats.datagrams_in, &s.stats.datagrams_out)
            }),
        )?;
        family(
            e,
            "l4lb_udp_dropped",
            "UDP datagrams dropped, by reason.",
            counter,
            &by_listener(&udp, "reason", |s| {
                vec![
                    ("no_backend", get(&s.stats.dropped_no_backend)),
                    ("denied", get(&s.stats.dropped_denied)),
                    ("no_socket", get(&s.stats.dropped_no_socket)),
                    ("unreachable", get(&s.stats.dropped_unreachable)),
                    ("busy", get(&s.stats.dropped_busy)),
                    ("per_source_rate", get(&s.stats.dropped_per_source_rate)),
                    ("untrusted", get(&s.stats.dropped_untrusted)),
                    ("proxy_header", get(&s.stats.dropped_proxy_header)),
                    ("oversize", get(&s.stats.dropped_oversize)),
                ]
            }),
        )?;

        // Backends.
        let mut up = Vec::new();
        let mut state = Vec::new();
        let mut active = Vec::new();
        let mut total = Vec::new();
        let mut failures = Vec::new();
        let mut changes = Vec::new();
        let mut checks = Vec::new();
        let mut histograms = Vec::new();
        for (pool_name, entry) in &control.pools {
            for b in entry.pool.snapshot().backends() {
                let labels = vec![
                    ("pool", pool_name.clone()),
                    ("backend", b.spec.addr.to_string()),
                ];
                let health = b.state.health();
                up.push((labels.clone(), u64::from(health == Health::Up)));
                for s in [
                    Health::Up,
                    Health::Down,
                    Health::Ejected,
                    Health::Draining,
                    Health::Disabled,
                ] {
                    let mut l = labels.clone();
                    l.push(("state", s.as_str().to_string()));
                    state.push((l, u64::from(health == s)));
                }
                active.push((labels.clone(), b.state.active()));
                total.push((labels.clone(), b.state.total()));
                for reason in FailureReason::ALL {
                    let mut l = labels.clone();
                    l.push(("reason", reason.as_str().to_string()));
                    failures.push((l, b.state.stats.failures(reason)));
                }
                changes.push((labels.clone(), b.state.stats.state_changes()));
                let (ok, failed) = b.state.stats.checks();
                let mut l = labels.clone();
                l.push(("result", "ok".to_string()));
                checks.push((l, ok));
                let mut l = labels.clone();
                l.push(("result", "failed".to_string()));
                checks.push((l, failed));
                histograms.push((labels, b.state.stats.connect_histogram()));
            }
        }
        family(
            e,
            "l4lb_backend_up",
            "1 if the backend takes new connections.",
            MetricType::Gauge,
            &up,
        )?;
        family(
            e,
            "l4lb_backend_state",
            "1 for the backend's current state.",
            MetricType::Gauge,
            &state,
        )?;
        family(
            e,
            "l4lb_backend_connections_active",
            "Connections (or UDP flows) on the backend now.",
            MetricType::Gauge,
            &active,
        )?;
        family(
            e,
            "l4lb_backend_connections",
            "Connections (or UDP flows) assigned to the backend.",
            MetricType::Counter,
            &total,
        )?;
        family(
            e,
            "l4lb_backend_connect_failures",
            "Failed connects to the backend, by reason.",
            MetricType::Counter,
            &failures,
        )?;
        family(
            e,
            "l4lb_backend_state_changes",
            "Health state changes of the backend.",
            MetricType::Counter,
            &changes,
        )?;
        family(
            e,
            "l4lb_health_checks",
            "Active probes, by result.",
            MetricType::Counter,
            &checks,
        )?;
        let mut metric = e.encode_descriptor(
            "l4lb_backend_connect_seconds",
            "Time to establish a TCP connection to the backend.",
            None,
            MetricType::Histogram,
        )?;
        for (labels, (sum, count, buckets)) in &histograms {
            let bounds = CONNECT_BUCKETS
                .iter()
                .copied()
                .chain(std::iter::once(f64::MAX));
            let buckets: Vec<(f64, u64)> = bounds.zip(buckets.iter().copied()).collect();
            metric
                .encode_family(labels)?
                .encode_histogram::<NoLabelSet>(*sum, *count, &buckets, None)?;
        }

        // Reloads.
        let reloads = &control.reloads;
        family(
            e,
            "l4lb_config_reloads",
            "Config reloads, by result.",
            MetricType::Counter,
            &[
                (vec![("result", "success".to_string())], get(&reloads.ok)),
                (
                    vec![("result", "failure".to_string())],
                    get(&reloads.failed),
                ),
            ],
        )?;
        family(
            e,
            "l4lb_config_last_reload_success_timestamp_seconds",
            "When the config was last applied (start or reload).",
            MetricType::Gauge,
            &[(Vec::<(&str, String)>::new(), get(&reloads.last_ok_unix))],
        )?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn counters_get_their_total_name_in_the_classic_format() {
        let om = "# HELP a_x Things.\n# TYPE a_x counter\na_x_total{l=\"1\"} 3\n# HELP g A gauge.\n# TYPE g gauge\ng 1\n# EOF\n";
        assert_eq!(
            super::to_prometheus_text(om),
            "# HELP a_x_total Things.\n# TYPE a_x_total counter\na_x_total{l=\"1\"} 3\n# HELP g A gauge.\n# TYPE g gauge\ng 1\n"
        );
    }
}
