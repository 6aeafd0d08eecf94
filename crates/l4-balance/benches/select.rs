//! Selection cost per call for every algorithm over 100 backends, and Maglev table builds.
//! Targets (issue 3): select < 50 ns, build 100 x 65537 < 5 ms, 1000 x 655373 < 100 ms.
#![allow(clippy::unwrap_used)] // a test that cannot unwrap has failed

use std::hint::black_box;
use std::net::SocketAddr;

use criterion::{criterion_group, criterion_main, Criterion};
use l4_balance::{
    build_maglev_table, Algorithm, BackendSpec, FlowKey, HashKey, Health, PoolSnapshot, Protocol,
    TimeMetric, DEFAULT_TABLE_SIZE,
};

fn addr(i: usize) -> SocketAddr {
    SocketAddr::from(([10, 1, (i / 200) as u8, (i % 200) as u8 + 1], 8000))
}

fn specs(n: usize) -> Vec<BackendSpec> {
    (0..n)
        .map(|i| BackendSpec {
            addr: addr(i),
            weight: 1 + (i % 3) as u32,
            backup: false,
        })
        .collect()
}

const ALGORITHMS: [Algorithm; 6] = [
    Algorithm::RoundRobin,
    Algorithm::LeastConn,
    Algorithm::PowerOfTwo,
    Algorithm::LeastTime(TimeMetric::Connect),
    Algorithm::SourceHash(HashKey::SrcIp),
    Algorithm::Maglev {
        key: HashKey::FiveTuple,
        table_size: DEFAULT_TABLE_SIZE,
    },
];

/// Selection over `backends` backends of which `down` are down, for every algorithm.
fn bench_group(c: &mut Criterion, group: &str, backends: usize, down: usize) {
    let mut group = c.benchmark_group(group);
    for algorithm in ALGORITHMS {
        let snap = PoolSnapshot::build(algorithm, &specs(backends), |_| None).unwrap();
        for b in snap.backends().take(down) {
            b.state.set_health(Health::Down);
        }
        let mut port = 0u16;
        group.bench_function(algorithm.as_str(), |b| {
            b.iter(|| {
                port = port.wrapping_add(1);
                let key = FlowKey {
                    client: SocketAddr::from(([192, 168, 1, 7], port)),
                    local: SocketAddr::from(([127, 0, 0, 1], 443)),
                    protocol: Protocol::Tcp,
                };
                black_box(snap.select(black_box(&key), &[]))
            })
        });
    }
    group.finish();
}

fn select(c: &mut Criterion) {
    bench_group(c, "select_100_backends", 100, 0);
    // The cost of failover: one of ten backends down (issue 9).
    bench_group(c, "select_10_backends_1_down", 10, 1);
}

fn maglev_build(c: &mut Criterion) {
    let mut group = c.benchmark_group("maglev_build");
    group.sample_size(10);
    let small: Vec<(SocketAddr, u32)> = (0..100).map(|i| (addr(i), 1)).collect();
    group.bench_function("100_backends_65537", |b| {
        b.iter(|| build_maglev_table(black_box(&small), 65537))
    });
    let large: Vec<(SocketAddr, u32)> = (0..1000).map(|i| (addr(i), 1)).collect();
    group.bench_function("1000_backends_655373", |b| {
        b.iter(|| build_maglev_table(black_box(&large), 655373))
    });
    group.finish();
}

criterion_group!(benches, select, maglev_build);
criterion_main!(benches);
