//! Backend sets change atomically: while one thread replaces a service's
//! backend set as fast as it can, connections through the VIP never fail and
//! never land outside a complete set.

use std::{
    net::{IpAddr, SocketAddr},
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::Result;
use mesh_agent::{
    bpf::{Datapath, LogSites, MapSizes, PinLayout},
    reconcile::{Capacity, Reconciler},
    state::{Algorithm, Backend, BackendState, DesiredState, PanicMode, Policy, Protocol, Service},
};
use mesh_tests::{TestBackend, TestCgroup, run_probe};

/// Removes the test's pins (detaching its programs) on every path.
struct Pins(PinLayout);

impl Drop for Pins {
    fn drop(&mut self) {
        let _ = self.0.remove_all();
    }
}

fn desired(vip: SocketAddr, backends: &[(&TestBackend, u32)]) -> DesiredState {
    DesiredState {
        services: vec![Service {
            name: "web".into(),
            vip: vip.ip(),
            port: vip.port(),
            protocol: Protocol::Tcp,
            algorithm: Algorithm::Weighted,
            affinity_timeout_s: None,
            policy: Policy::default(),
            drain_timeout_s: 0,
            destroy_on_removal: None,
            health_check: None,
            outlier_detection: None,
            panic_mode: PanicMode::All,
            same_node_redirect: true,
            mtls: None,
            backends: backends
                .iter()
                .map(|(b, weight)| Backend {
                    address: b.addr().ip(),
                    port: b.port(),
                    weight: *weight,
                    state: BackendState::Active,
                    node: None,
                    tunnel: false,
                    priority: 0,
                })
                .collect(),
            origin: None,
        }],
        ..DesiredState::default()
    }
}

#[test]
fn connections_never_see_a_partial_backend_set_during_rapid_updates() -> Result<()> {
    let backends: Vec<TestBackend> = (1..=6).map(TestBackend::new).collect::<Result<_>>()?;
    let vip: SocketAddr = (
        format!("127.13.{}.1", std::process::id() % 250 + 1).parse::<IpAddr>()?,
        80,
    )
        .into();
    // Disjoint sets with different table sizes (3 and 10 slots), so a reader
    // that mixed the service entry of one with the slots of the other would
    // miss a slot or a backend and fail its connect.
    let set_a = desired(
        vip,
        &[(&backends[0], 1), (&backends[1], 1), (&backends[2], 1)],
    );
    let set_b = desired(
        vip,
        &[(&backends[3], 1), (&backends[4], 2), (&backends[5], 7)],
    );

    let cgroup = TestCgroup::new("atomic")?;
    let pins = Pins(PinLayout::new(format!(
        "/sys/fs/bpf/mesh-test-atomic-{}",
        std::process::id()
    )));
    let mut datapath = Datapath::load(&pins.0, cgroup.path(), MapSizes::default(), LogSites::Kept)?;
    let mut reconciler = Reconciler::recover(Capacity::of(&datapath.maps), &mut datapath.maps);
    reconciler.apply(&set_a, &mut datapath.maps)?;

    let stop = Arc::new(AtomicBool::new(false));
    let applied = Arc::new(AtomicU64::new(0));
    let updater = std::thread::spawn({
        let (stop, applied) = (stop.clone(), applied.clone());
        move || -> Result<()> {
            // Bounded: stops when told, or after 60 s whatever happens.
            let deadline = Instant::now() + Duration::from_secs(60);
            while !stop.load(Ordering::Relaxed) && Instant::now() < deadline {
                reconciler.apply(&set_b, &mut datapath.maps)?;
                reconciler.apply(&set_a, &mut datapath.maps)?;
                applied.fetch_add(2, Ordering::Relaxed);
            }
            Ok(())
        }
    });

    let started = Instant::now();
    let result = run_probe(&cgroup, vip, 5_000);
    let elapsed = started.elapsed();
    let during = applied.load(Ordering::Relaxed);
    stop.store(true, Ordering::Relaxed);
    updater.join().expect("updater thread")?;
    let result = result?;

    eprintln!(
        "{during} backend-set replacements in {elapsed:?} ({:.0}/s) while connecting",
        during as f64 / elapsed.as_secs_f64()
    );
    assert!(
        during >= 100,
        "the updater must have run concurrently ({during} updates)"
    );
    assert_eq!(result.ok, 5_000, "no connection may fail: {result:?}");
    let outside: u64 = result
        .ids
        .iter()
        .filter(|(id, _)| !(1..=6).any(|i| i.to_string() == **id))
        .map(|(_, n)| n)
        .sum();
    assert_eq!(outside, 0, "{result:?}");
    // Both sets served: the switches really happened under the clients.
    let from_a: u64 = (1..=3).map(|id| result.id_count(id)).sum();
    let from_b: u64 = (4..=6).map(|id| result.id_count(id)).sum();
    assert!(from_a > 0 && from_b > 0, "{result:?}");
    Ok(())
}
