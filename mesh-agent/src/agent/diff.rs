//! The disagreement check (`diff.rs`) as the agent runs it: a slice of the
//! services against the kernel on every tick (a pass over 10,000 services
//! takes 20 ticks and never holds the lock long), the source's own view
//! every few ticks, and everything at once for `meshctl diff`.

use std::collections::BTreeSet;
use std::ops::Bound;
use std::time::Instant;

use super::Shared;
use crate::diff::{self, DiffResponse, Layer};
use crate::state::Service;

/// Services compared with the kernel per tick.
const KERNEL_SLICE: usize = 512;

impl Shared {
    fn tracker(&self) -> std::sync::MutexGuard<'_, diff::Tracker> {
        self.metrics.diff.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Compares the next slice of services with the kernel's maps; at the
    /// end of a pass, also the kernel's frontends no service has.
    pub(super) fn check_kernel_slice(&self) {
        let mut inner = self.lock();
        let inner = &mut *inner;
        let from = match inner.diff_cursor.take() {
            Some(after) => Bound::Excluded(after),
            None => Bound::Unbounded,
        };
        let slice: Vec<&Service> = inner
            .desired
            .services
            .range::<String, _>((from, Bound::Unbounded))
            .map(|(_, s)| &**s)
            .take(KERNEL_SLICE)
            .collect();
        let checked: BTreeSet<String> = slice.iter().map(|s| s.name.clone()).collect();
        let found = diff::kernel(slice.iter().copied(), &inner.maps);
        let now = Instant::now();
        let mut tracker = self.tracker();
        tracker.observe(Layer::Kernel, Some(&checked), found, now);
        if slice.len() == KERNEL_SLICE {
            inner.diff_cursor = checked.last().cloned();
            return;
        }
        // A whole pass is done.
        let orphans = diff::kernel_orphans(&inner.desired, &inner.maps);
        let filed = BTreeSet::from([diff::ORPHANS.to_owned()]);
        tracker.observe(Layer::Kernel, Some(&filed), orphans, now);
        let desired = &inner.desired;
        tracker.forget_unless(Layer::Kernel, |name| {
            name == diff::ORPHANS || desired.services.contains_key(name)
        });
    }

    /// Compares the source's own view (where it has one) with what the
    /// agent accepted from it; false when the source has no view.
    pub(super) async fn check_source(&self) -> bool {
        let Some((views, _)) = self.lock().source.view() else {
            return false;
        };
        let Some(view) = views.get().await else {
            return false;
        };
        let inner = self.lock();
        let in_flight = inner
            .source
            .view()
            .map(|(_, in_flight)| in_flight)
            .unwrap_or_default();
        let found = diff::source(&view, inner.source.current(), &in_flight);
        self.tracker()
            .observe(Layer::Source, None, found, Instant::now());
        true
    }

    /// `meshctl diff`: every comparison now, and what stands.
    pub async fn diff(&self) -> DiffResponse {
        let source_compared = self.check_source().await;
        let inner = self.lock();
        let mut found = diff::kernel(inner.desired.iter(), &inner.maps);
        found.extend(diff::kernel_orphans(&inner.desired, &inner.maps));
        let now = Instant::now();
        let mut tracker = self.tracker();
        tracker.observe(Layer::Kernel, None, found, now);
        DiffResponse {
            source_compared,
            services_checked: inner.desired.len(),
            disagreements: tracker.standing(now),
        }
    }
}
