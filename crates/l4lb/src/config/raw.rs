//! The file as written: serde structs that reject unknown keys and keep every value in the
//! type the YAML gave it, so validation can say exactly what is wrong and where.

use serde::Deserialize;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawConfig {
    pub(super) workers: Option<usize>,
    pub(super) max_pipes: Option<usize>,
    pub(super) admin: Option<String>,
    pub(super) admin_token: Option<String>,
    pub(super) log: Option<RawLog>,
    pub(super) drain_timeout: Option<RawDuration>,
    pub(super) shutdown_delay: Option<RawDuration>,
    #[serde(default)]
    pub(super) defaults: RawDefaults,
    #[serde(default)]
    pub(super) listeners: Vec<RawListener>,
    #[serde(default)]
    pub(super) pools: Vec<RawPool>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawLog {
    pub(super) access: Option<String>,
    pub(super) format: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawDefaults {
    pub(super) connect_timeout: Option<RawDuration>,
    pub(super) idle_timeout: Option<RawDuration>,
    pub(super) retries: Option<u32>,
    pub(super) relay: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawListener {
    pub(super) name: String,
    pub(super) bind: String,
    pub(super) protocol: Option<String>,
    pub(super) pool: Option<String>,
    pub(super) proxy_protocol: Option<String>,
    #[serde(default)]
    pub(super) allow: Vec<String>,
    #[serde(default)]
    pub(super) deny: Vec<String>,
    pub(super) max_connections: Option<usize>,
    pub(super) connect_timeout: Option<RawDuration>,
    pub(super) idle_timeout: Option<RawDuration>,
    pub(super) retries: Option<u32>,
    pub(super) relay: Option<String>,
    pub(super) sni: Option<Vec<RawSniRoute>>,
    pub(super) freebind: Option<bool>,
    pub(super) sni_timeout: Option<RawDuration>,
    pub(super) sni_postgres: Option<bool>,
    pub(super) accept_proxy: Option<RawAcceptProxy>,
    pub(super) proxy_protocol_udp: Option<String>,
    pub(super) max_flows: Option<usize>,
    pub(super) max_connections_per_source: Option<u32>,
    pub(super) max_new_connections_per_second_per_source: Option<u32>,
    pub(super) max_new_flows_per_second_per_source: Option<u32>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawAcceptProxy {
    #[serde(default)]
    pub(super) from: Vec<String>,
    pub(super) timeout: Option<RawDuration>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawSniRoute {
    #[serde(rename = "match")]
    pub(super) pattern: String,
    pub(super) pool: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawPool {
    pub(super) name: String,
    pub(super) algorithm: Option<String>,
    pub(super) hash: Option<String>,
    pub(super) table_size: Option<u32>,
    pub(super) least_time: Option<String>,
    pub(super) health: Option<RawHealth>,
    pub(super) passive: Option<RawPassive>,
    pub(super) on_down: Option<String>,
    pub(super) discovery: Option<RawDiscovery>,
    pub(super) slow_start: Option<RawDuration>,
    pub(super) close_after: Option<RawDuration>,
    #[serde(default)]
    pub(super) source: Vec<String>,
    #[serde(default)]
    pub(super) backends: Vec<RawBackend>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawDiscovery {
    pub(super) dns: String,
    #[serde(rename = "type")]
    pub(super) kind: Option<String>,
    pub(super) port: Option<u16>,
    pub(super) interval: Option<RawDuration>,
    pub(super) resolver: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawPassive {
    pub(super) failures: Option<u32>,
    pub(super) max_ejection_percent: Option<u32>,
    pub(super) ejection_time: Option<RawDuration>,
    pub(super) max_ejection_time: Option<RawDuration>,
    pub(super) empty_close_fails: Option<bool>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawHealth {
    pub(super) interval: Option<RawDuration>,
    pub(super) timeout: Option<RawDuration>,
    pub(super) rise: Option<u32>,
    pub(super) fall: Option<u32>,
    pub(super) port: Option<u16>,
    pub(super) check: Option<String>,
    pub(super) send: Option<String>,
    pub(super) send_hex: Option<String>,
    pub(super) expect: Option<String>,
    pub(super) expect_regex: Option<String>,
    pub(super) http: Option<RawHttpCheck>,
    pub(super) dns_name: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawHttpCheck {
    pub(super) method: Option<String>,
    pub(super) path: Option<String>,
    pub(super) host: Option<String>,
    #[serde(default)]
    pub(super) status: Vec<u16>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawBackend {
    pub(super) address: String,
    pub(super) weight: Option<u32>,
    #[serde(default)]
    pub(super) backup: bool,
}

/// A duration as written: `3s`, `500ms`, `1m 30s`. A bare number is kept so that the
/// error can say why it is refused instead of a generic type error.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub(super) enum RawDuration {
    Text(String),
    Number(serde_yaml_ng::Number),
}
