//! Micro-benchmarks of the agent's pure logic: slot-table construction and
//! the config parser. `cargo xtask bench` runs them and records the means.

use std::fmt::Write as _;
use std::hint::black_box;

use criterion::{BenchmarkId, Criterion, criterion_group, criterion_main};
use mesh_agent::{config, slots};

fn slot_tables(c: &mut Criterion) {
    let mut group = c.benchmark_group("slots");
    // Equal weights (the common case) and uneven ones that must be scaled.
    for backends in [10u32, 100, 1000] {
        let equal = vec![1u32; backends as usize];
        group.bench_with_input(
            BenchmarkId::new("weighted_table_equal", backends),
            &equal,
            |b, w| b.iter(|| slots::weighted_table(black_box(w), 16_384)),
        );
        let uneven: Vec<u32> = (0..backends).map(|i| 1 + (i * 7919) % 65_535).collect();
        group.bench_with_input(
            BenchmarkId::new("weighted_table_scaled", backends),
            &uneven,
            |b, w| b.iter(|| slots::weighted_table(black_box(w), 16_384)),
        );
    }
    group.finish();
}

fn config_text(services: u32) -> String {
    let mut y = String::from("services:\n");
    for i in 0..services {
        let _ = write!(
            y,
            "  - name: s{i:06}\n    vip: 10.96.{}.{}\n    port: 80\n    backends: [",
            i / 250,
            1 + i % 250
        );
        for j in 0..10 {
            let sep = if j < 9 { ", " } else { "" };
            let _ = write!(y, "{{address: 10.200.0.{}, port: 8080}}{sep}", j + 1);
        }
        y.push_str("]\n");
    }
    y
}

fn config_parser(c: &mut Criterion) {
    let mut group = c.benchmark_group("config");
    for services in [10u32, 1000] {
        let text = config_text(services);
        group.bench_with_input(BenchmarkId::new("parse_str", services), &text, |b, t| {
            b.iter(|| config::parse_str(black_box(t), "bench.yaml").expect("valid"))
        });
    }
    group.finish();
}

criterion_group!(benches, slot_tables, config_parser);
criterion_main!(benches);
