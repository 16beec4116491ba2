//! Slot tables for weighted backend selection.
//!
//! The kernel picks a uniformly random slot; a backend holding `k` of `n`
//! slots therefore gets `k/n` of new connections. Building the table is the
//! agent's job, so the kernel does one lookup and no arithmetic on weights.

/// Returns, for each slot, the index of the backend (into `weights`) that owns
/// it. Weights are reduced by their greatest common divisor so the table is as
/// small as it can be while exact; a table that would exceed `max_slots` is
/// scaled down by largest remainder, and every backend with a weight above
/// zero keeps at least one slot so small weights are never starved.
pub fn weighted_table(weights: &[u32], max_slots: u32) -> Vec<u32> {
    let counts = slot_counts(weights, max_slots);
    counts
        .iter()
        .enumerate()
        .flat_map(|(index, &count)| std::iter::repeat_n(index as u32, count as usize))
        .collect()
}

/// Lays out a table of `counts` (owner, slots) keeping every slot that can
/// stay with its previous owner where it was: when the table size is
/// unchanged, a weight change moves only the slots that must move.
pub fn stable_layout(previous: &[u32], counts: &[(u32, u32)]) -> Vec<u32> {
    let size: usize = counts.iter().map(|&(_, c)| c as usize).sum();
    let mut remaining: std::collections::BTreeMap<u32, u32> = counts.iter().copied().collect();
    let mut table: Vec<Option<u32>> = vec![None; size];
    if previous.len() == size {
        for (slot, owner) in previous.iter().enumerate() {
            if let Some(left) = remaining.get_mut(owner).filter(|left| **left > 0) {
                *left -= 1;
                table[slot] = Some(*owner);
            }
        }
    }
    let mut refill = counts
        .iter()
        .flat_map(|&(owner, _)| std::iter::repeat_n(owner, remaining[&owner] as usize));
    // Built apart rather than mapped in place: in-place collection would
    // keep the twice-as-large allocation of `table` for as long as the agent
    // keeps the layout.
    let mut layout = Vec::with_capacity(size);
    layout.extend(
        table
            .into_iter()
            .map(|slot| slot.or_else(|| refill.next()).expect("sizes match")),
    );
    layout
}

/// How many slots each backend gets.
pub fn slot_counts(weights: &[u32], max_slots: u32) -> Vec<u32> {
    let divisor = weights.iter().copied().filter(|&w| w > 0).fold(0, gcd);
    if divisor == 0 {
        return vec![0; weights.len()];
    }
    let reduced: Vec<u64> = weights.iter().map(|&w| u64::from(w / divisor)).collect();
    let total: u64 = reduced.iter().sum();
    // Every positive weight needs a slot, so the table never gets smaller
    // than the number of such backends.
    let positive = reduced.iter().filter(|&&c| c > 0).count() as u64;
    let max_slots = u64::from(max_slots).max(positive);
    if total <= max_slots {
        return reduced.iter().map(|&c| c as u32).collect();
    }
    apportion(&reduced, total, max_slots)
}

/// Exactly `size` entries split by `weights` (largest remainder, at least one
/// for every positive weight), for tables whose size is fixed (Maglev).
pub fn exact_shares(weights: &[u32], size: u32) -> Vec<u32> {
    let shares: Vec<u64> = weights.iter().map(|&w| u64::from(w)).collect();
    let total: u64 = shares.iter().sum();
    if total == 0 {
        return vec![0; weights.len()];
    }
    apportion(&shares, total, u64::from(size))
}

/// Largest-remainder apportionment of `slots` seats by `shares`, with a floor
/// of one seat for every positive share.
fn apportion(shares: &[u64], total: u64, slots: u64) -> Vec<u32> {
    let mut counts: Vec<u64> = shares
        .iter()
        .map(|&s| {
            if s == 0 {
                0
            } else {
                (s * slots / total).max(1)
            }
        })
        .collect();
    let mut assigned: u64 = counts.iter().sum();
    // Hand out what is left by largest remainder.
    // A share raised to its one-slot floor already has more than its quota.
    let mut by_remainder: Vec<usize> = (0..shares.len())
        .filter(|&i| shares[i] * slots / total > 0)
        .collect();
    by_remainder.sort_by_key(|&i| std::cmp::Reverse((shares[i] * slots) % total));
    for &i in by_remainder.iter().cycle().take(shares.len() * 2) {
        if assigned >= slots {
            break;
        }
        counts[i] += 1;
        assigned += 1;
    }
    // The one-slot floor may overshoot: take back from the largest holders.
    while assigned > slots {
        let Some(i) = (0..counts.len())
            .filter(|&i| counts[i] > 1)
            .max_by_key(|&i| counts[i])
        else {
            break;
        };
        counts[i] -= 1;
        assigned -= 1;
    }
    counts.into_iter().map(|c| c as u32).collect()
}

fn gcd(a: u32, b: u32) -> u32 {
    if b == 0 { a } else { gcd(b, a % b) }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exact_weights_use_the_smallest_exact_table() {
        assert_eq!(slot_counts(&[1, 2, 7], 16_384), vec![1, 2, 7]);
        assert_eq!(slot_counts(&[100, 200, 700], 16_384), vec![1, 2, 7]);
        assert_eq!(weighted_table(&[1, 2], 16), vec![0, 1, 1]);
    }

    #[test]
    fn zero_weights_get_no_slots() {
        assert_eq!(slot_counts(&[0, 3, 0], 16), vec![0, 1, 0]);
        assert!(weighted_table(&[0, 0], 16).is_empty());
        assert!(weighted_table(&[], 16).is_empty());
    }

    #[test]
    fn large_tables_are_scaled_within_one_slot_and_never_starve() {
        let weights = [65_535, 65_534, 1, 7];
        let counts = slot_counts(&weights, 1000);
        assert_eq!(counts.iter().sum::<u32>(), 1000);
        assert!(counts[2] >= 1 && counts[3] >= 1, "{counts:?}");
        let total: f64 = weights.iter().map(|&w| f64::from(w)).sum();
        for (w, c) in weights.iter().zip(&counts) {
            let ideal = f64::from(*w) / total * 1000.0;
            assert!((f64::from(*c) - ideal).abs() <= 1.0, "{counts:?}");
        }
    }

    #[test]
    fn many_tiny_weights_fit_even_when_the_floor_overshoots() {
        let mut weights = vec![1; 20];
        weights.push(1_000_000);
        let counts = slot_counts(&weights, 32);
        assert_eq!(counts.iter().sum::<u32>(), 32);
        assert!(counts.iter().all(|&c| c >= 1), "{counts:?}");
        assert_eq!(counts[20], 12);
    }

    #[test]
    fn stable_layout_moves_only_what_must_move() {
        let before = stable_layout(&[], &[(1, 2), (2, 2), (3, 4)]);
        assert_eq!(before, vec![1, 1, 2, 2, 3, 3, 3, 3]);
        let after = stable_layout(&before, &[(1, 3), (2, 2), (3, 3)]);
        let moved = before.iter().zip(&after).filter(|(a, b)| a != b).count();
        assert_eq!(moved, 1, "{after:?}");
        assert_eq!(after.iter().filter(|&&o| o == 1).count(), 3);
    }

    #[test]
    fn the_table_grows_to_give_every_backend_a_slot() {
        let counts = slot_counts(&[1, 1_000_000, 1], 2);
        assert_eq!(counts, vec![1, 1, 1]);
    }
}

#[cfg(test)]
mod properties {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        /// Every backend's share is within one slot of its exact share, plus
        /// the slots handed to backends too small for even one slot (the
        /// floor that keeps small weights from starving).
        #[test]
        fn weights_are_honoured_within_one_slot(
            weights in proptest::collection::vec(0u32..=65_535, 1..40),
            max in 16u32..=16_384,
        ) {
            let counts = slot_counts(&weights, max);
            let total: f64 = weights.iter().map(|&w| f64::from(w)).sum();
            let size: u32 = counts.iter().sum();
            if total == 0.0 {
                prop_assert_eq!(size, 0);
                return Ok(());
            }
            let floored = weights
                .iter()
                .filter(|&&w| w > 0 && f64::from(w) / total * f64::from(size) < 1.0)
                .count() as f64;
            for (w, c) in weights.iter().zip(&counts) {
                let ideal = f64::from(*w) / total * f64::from(size);
                prop_assert!(
                    (f64::from(*c) - ideal).abs() <= 1.0 + floored + 1e-9,
                    "{weights:?} -> {counts:?}"
                );
                prop_assert!(*w == 0 || *c >= 1);
            }
        }

        /// With an unchanged table size, the slots that change owner are
        /// exactly those an owner had to give up.
        #[test]
        fn weight_changes_move_the_minimum(
            old in proptest::collection::vec(1u32..50, 2..10),
            delta in proptest::collection::vec(-20i32..20, 2..10),
        ) {
            let owners: Vec<u32> = (0..old.len() as u32).collect();
            let before_counts: Vec<(u32, u32)> = owners.iter().copied().zip(old.iter().copied()).collect();
            let size: u32 = old.iter().sum();
            // New counts with the same total: shift slots between owners.
            let mut new = old.clone();
            for (i, d) in delta.iter().enumerate().take(new.len() - 1) {
                let moved = (*d).clamp(-(new[i] as i32), new[new.len() - 1] as i32);
                new[i] = (new[i] as i32 + moved) as u32;
                let last = new.len() - 1;
                new[last] = (new[last] as i32 - moved) as u32;
            }
            prop_assert_eq!(new.iter().sum::<u32>(), size);
            let after_counts: Vec<(u32, u32)> = owners.iter().copied().zip(new.iter().copied()).collect();
            let before = stable_layout(&[], &before_counts);
            let after = stable_layout(&before, &after_counts);
            let moved = before.iter().zip(&after).filter(|(a, b)| a != b).count() as u32;
            let minimum: u32 = old.iter().zip(&new).map(|(o, n)| o.saturating_sub(*n)).sum();
            prop_assert_eq!(moved, minimum);
        }
    }
}
