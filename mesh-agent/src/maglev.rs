//! Maglev consistent hashing (Eisenbud et al., NSDI 2016) with weights.
//!
//! Each backend walks its own pseudo-random permutation of the table and
//! claims the first free entry on every turn, until it holds its share. A
//! backend's permutation depends only on its address, so every node builds
//! the same table, and removing one backend only moves the entries it held
//! (plus a few displaced ones).

use std::net::SocketAddr;

use crate::slots::exact_shares;

/// Table sizes: primes, each a little under a power of two.
const PRIMES: [u32; 10] = [
    251, 509, 1_021, 2_039, 4_093, 8_191, 16_381, 32_749, 65_521, 131_071,
];

/// Entries per backend. The paper asks for M > 100·N for an even spread;
/// four times that cuts the clients that move when a backend goes from
/// about 2.7% to about 1% (measured with 10 backends).
const ENTRIES_PER_BACKEND: u64 = 400;

/// The smallest listed prime above `ENTRIES_PER_BACKEND` per backend,
/// capped at `max`.
pub fn table_size(backends: usize, max: u32) -> u32 {
    let wanted = (backends as u64 * ENTRIES_PER_BACKEND).min(u64::from(u32::MAX)) as u32;
    PRIMES
        .iter()
        .copied()
        .find(|&p| p > wanted && p <= max)
        .unwrap_or_else(|| {
            PRIMES
                .iter()
                .copied()
                .filter(|&p| p <= max)
                .max()
                .unwrap_or(PRIMES[0])
        })
}

/// Builds a table of `size` entries (a prime), each the index of a backend in
/// `backends`. Backends with weight 0 get no entries.
pub fn build(backends: &[(SocketAddr, u32)], size: u32) -> Vec<u32> {
    // Work in address order, not list order, so every node builds the same
    // table whatever order its source lists the backends in.
    let mut order: Vec<usize> = (0..backends.len()).collect();
    order.sort_by_key(|&i| backends[i].0);
    let sorted: Vec<(SocketAddr, u32)> = order.iter().map(|&i| backends[i]).collect();
    build_sorted(&sorted, size)
        .into_iter()
        .map(|i| order[i as usize] as u32)
        .collect()
}

fn build_sorted(backends: &[(SocketAddr, u32)], size: u32) -> Vec<u32> {
    let weights: Vec<u32> = backends.iter().map(|&(_, w)| w).collect();
    if weights.iter().all(|&w| w == 0) {
        return Vec::new();
    }
    let mut quota = exact_shares(&weights, size);
    let m = u64::from(size);
    let walks: Vec<(u64, u64)> = backends
        .iter()
        .map(|(addr, _)| {
            let key = addr.to_string();
            let offset = fnv1a(key.as_bytes(), 0x6d61_676c) % m;
            let skip = fnv1a(key.as_bytes(), 0x6576_6a21) % (m - 1) + 1;
            (offset, skip)
        })
        .collect();
    let mut next = vec![0u64; backends.len()];
    let mut table: Vec<Option<u32>> = vec![None; size as usize];
    let mut filled = 0;
    while filled < size as usize {
        for (i, &(offset, skip)) in walks.iter().enumerate() {
            if quota[i] == 0 {
                continue;
            }
            // `skip` is coprime with the prime `size`, so the walk visits
            // every entry and a free one is always found.
            loop {
                let entry = ((offset + next[i] * skip) % m) as usize;
                next[i] += 1;
                if table[entry].is_none() {
                    table[entry] = Some(i as u32);
                    quota[i] -= 1;
                    filled += 1;
                    break;
                }
            }
            if filled == size as usize {
                break;
            }
        }
    }
    table
        .into_iter()
        .map(|e| e.expect("every entry filled"))
        .collect()
}

/// FNV-1a, 64 bit, seeded: stable across builds and machines.
fn fnv1a(bytes: &[u8], seed: u64) -> u64 {
    let mut hash = 0xcbf2_9ce4_8422_2325u64 ^ seed;
    for &b in bytes {
        hash ^= u64::from(b);
        hash = hash.wrapping_mul(0x0100_0000_01b3);
    }
    hash
}

#[cfg(test)]
mod tests {
    use super::*;

    fn backends(n: u16, weight: u32) -> Vec<(SocketAddr, u32)> {
        (0..n)
            .map(|i| (SocketAddr::from(([10, 0, 0, 1], 8000 + i)), weight))
            .collect()
    }

    #[test]
    fn sizes_are_primes_above_four_hundred_per_backend() {
        assert_eq!(table_size(1, 131_071), 509);
        assert_eq!(table_size(10, 131_071), 4_093);
        assert_eq!(table_size(1000, 131_071), 131_071);
        assert_eq!(table_size(5000, 131_071), 131_071);
        assert_eq!(table_size(10, 1_021), 1_021);
    }

    #[test]
    fn equal_weights_share_the_table_evenly() {
        let table = build(&backends(10, 1), 1_021);
        assert_eq!(table.len(), 1_021);
        for i in 0..10 {
            let n = table.iter().filter(|&&e| e == i).count();
            assert!((102..=103).contains(&n), "backend {i}: {n}");
        }
    }

    #[test]
    fn weights_are_honoured_within_one_entry() {
        let mut b = backends(3, 1);
        b[1].1 = 2;
        b[2].1 = 7;
        let table = build(&b, 1_021);
        for (i, w) in [(0u32, 1.0), (1, 2.0), (2, 7.0)] {
            let n = table.iter().filter(|&&e| e == i).count() as f64;
            assert!((n - 1_021.0 * w / 10.0).abs() <= 1.0, "backend {i}: {n}");
        }
    }

    #[test]
    fn removing_one_of_ten_backends_moves_few_other_entries() {
        let all = backends(10, 1);
        let before = build(&all, 4_093);
        let after = build(&all[1..], 4_093);
        // Indices in `after` are shifted by one.
        let kept = before
            .iter()
            .zip(&after)
            .filter(|&(&b, &a)| b != 0 && b == a + 1)
            .count();
        let not_removed = before.iter().filter(|&&b| b != 0).count();
        let kept_ratio = kept as f64 / not_removed as f64;
        assert!(kept_ratio > 0.985, "only {kept_ratio:.3} kept");
    }

    #[test]
    fn the_same_backends_give_the_same_table_in_any_order() {
        let b = backends(5, 1);
        let mut reversed = b.clone();
        reversed.reverse();
        let by_addr = |table: Vec<u32>, list: &[(SocketAddr, u32)]| -> Vec<SocketAddr> {
            table.into_iter().map(|i| list[i as usize].0).collect()
        };
        assert_eq!(
            by_addr(build(&b, 509), &b),
            by_addr(build(&reversed, 509), &reversed)
        );
    }
}

#[cfg(test)]
mod properties {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        /// Every backend holds its weighted share of the table within one entry.
        #[test]
        fn weights_are_honoured_within_one_entry(
            weights in proptest::collection::vec(0u32..1000, 1..30),
        ) {
            let backends: Vec<(SocketAddr, u32)> = weights
                .iter()
                .enumerate()
                .map(|(i, &w)| (SocketAddr::from(([10, 1, 0, 1], 1000 + i as u16)), w))
                .collect();
            let size = table_size(backends.len(), 131_071);
            let table = build(&backends, size);
            let total: f64 = weights.iter().map(|&w| f64::from(w)).sum();
            if total == 0.0 {
                prop_assert!(table.is_empty());
                return Ok(());
            }
            prop_assert_eq!(table.len(), size as usize);
            for (i, &w) in weights.iter().enumerate() {
                let held = table.iter().filter(|&&e| e == i as u32).count() as f64;
                let ideal = f64::from(w) / total * f64::from(size);
                prop_assert!((held - ideal).abs() <= 1.0 + 1e-9, "backend {i}: {held} vs {ideal}");
            }
        }
    }
}
