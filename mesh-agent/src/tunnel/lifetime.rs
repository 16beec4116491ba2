//! How long one tunnel connection may live. It never outlives the
//! certificates it was authenticated with, nor this node's credentials:
//!
//! - *retired* (takes no new stream; the pool opens a new connection for
//!   them, make-before-break) when this node's credentials changed since it
//!   was opened (a leaf or bundle reload: [`RetireReason::Rotation`]) or
//!   when either end's certificate nears its notAfter
//!   ([`RetireReason::Expiry`]): a margin of a quarter of that
//!   certificate's lifetime, at most 10 minutes, so short test
//!   certificates work too;
//! - closed once its streams end, and at the latest [`CLOSE_BEFORE`] ahead
//!   of the earlier notAfter (then the streams still open are reset).
//!
//! A connection opened already inside a certificate's margin is not
//! retired for it (a new one would present the same certificate); only
//! the close at expiry bounds it.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// The margin never exceeds this (production certificates live for hours).
pub const MAX_MARGIN: Duration = Duration::from_secs(600);
/// The margin is this fraction (1/N) of the certificate's lifetime.
pub const LIFETIME_FRACTION: u32 = 4;
/// How long before the earlier notAfter a connection is closed outright.
pub const CLOSE_BEFORE: Duration = Duration::from_secs(1);

/// A certificate's validity window.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Validity {
    pub not_before: SystemTime,
    pub not_after: SystemTime,
}

impl Validity {
    /// How long before notAfter connections are replaced.
    pub fn margin(&self) -> Duration {
        let lifetime = self
            .not_after
            .duration_since(self.not_before)
            .unwrap_or_default();
        (lifetime / LIFETIME_FRACTION).min(MAX_MARGIN)
    }

    /// From when a connection using this certificate takes no new stream.
    pub fn retire_at(&self) -> SystemTime {
        self.not_after
            .checked_sub(self.margin())
            .unwrap_or(self.not_before)
    }
}

/// Why a connection stopped taking new streams.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RetireReason {
    /// This node's certificate or trust bundle changed.
    Rotation,
    /// A certificate of either end nears its notAfter.
    Expiry,
}

impl RetireReason {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Rotation => "rotation",
            Self::Expiry => "expiry",
        }
    }
}

/// What a connection was opened with.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Lifetime {
    /// This node's credentials generation at the handshake.
    pub generation: u64,
    /// Our certificate and the peer's, when known.
    pub local: Option<Validity>,
    pub peer: Option<Validity>,
    pub opened: SystemTime,
}

impl Lifetime {
    /// The earlier notAfter of the two ends.
    pub fn expires(&self) -> Option<SystemTime> {
        self.certs().map(|v| v.not_after).min()
    }

    /// When it stops taking new streams for expiry (see the module doc).
    pub fn retire_at(&self) -> Option<SystemTime> {
        self.certs()
            .map(|v| v.retire_at())
            .filter(|at| *at > self.opened)
            .min()
    }

    /// When it is closed outright, whatever streams it still carries.
    pub fn close_at(&self) -> Option<SystemTime> {
        self.expires()
            .map(|at| at.checked_sub(CLOSE_BEFORE).unwrap_or(at))
    }

    /// Whether to retire it at `now`, given this node's current credentials
    /// generation (`None`: credentials that never change).
    pub fn retire(&self, now: SystemTime, generation: Option<u64>) -> Option<RetireReason> {
        if generation.is_some_and(|g| g != self.generation) {
            return Some(RetireReason::Rotation);
        }
        if self.retire_at().is_some_and(|at| now >= at) {
            return Some(RetireReason::Expiry);
        }
        None
    }

    fn certs(&self) -> impl Iterator<Item = Validity> {
        self.local.into_iter().chain(self.peer)
    }
}

/// `at` as a tokio deadline (now, if it has passed).
pub(crate) fn deadline(at: SystemTime) -> tokio::time::Instant {
    let wait = at.duration_since(SystemTime::now()).unwrap_or_default();
    tokio::time::Instant::now() + wait
}

pub(crate) fn unix_secs(at: SystemTime) -> Option<u64> {
    at.duration_since(UNIX_EPOCH).ok().map(|d| d.as_secs())
}

#[cfg(test)]
mod tests {
    use super::*;

    const T0: u64 = 1_800_000_000;

    fn at(secs: u64) -> SystemTime {
        UNIX_EPOCH + Duration::from_secs(T0 + secs)
    }

    fn valid(from: u64, to: u64) -> Option<Validity> {
        Some(Validity {
            not_before: at(from),
            not_after: at(to),
        })
    }

    fn conn(local: Option<Validity>, peer: Option<Validity>, opened: u64) -> Lifetime {
        Lifetime {
            generation: 3,
            local,
            peer,
            opened: at(opened),
        }
    }

    #[test]
    fn the_margin_is_a_quarter_of_the_lifetime_and_at_most_ten_minutes() {
        assert_eq!(valid(0, 80).unwrap().margin(), Duration::from_secs(20));
        assert_eq!(valid(0, 80).unwrap().retire_at(), at(60));
        assert_eq!(valid(0, 24 * 3600).unwrap().margin(), MAX_MARGIN);
        // A certificate that ends before it starts has no margin.
        assert_eq!(valid(10, 5).unwrap().margin(), Duration::ZERO);
    }

    #[test]
    fn a_change_of_generation_retires_at_once() {
        let c = conn(valid(0, 24 * 3600), valid(0, 24 * 3600), 1);
        assert_eq!(c.retire(at(2), Some(3)), None);
        assert_eq!(c.retire(at(2), Some(4)), Some(RetireReason::Rotation));
        // Credentials that never change never retire it for rotation.
        assert_eq!(c.retire(at(2), None), None);
    }

    #[test]
    fn the_earlier_certificate_of_the_two_ends_decides_the_expiry() {
        // Ours lives 0..80 s (margin 20 s), the peer's 0..1000 s (margin 250 s:
        // from 750 s).
        let c = conn(valid(0, 80), valid(0, 1000), 1);
        assert_eq!(c.expires(), Some(at(80)));
        assert_eq!(c.retire_at(), Some(at(60)));
        assert_eq!(c.close_at(), Some(at(79)));
        assert_eq!(c.retire(at(59), Some(3)), None);
        assert_eq!(c.retire(at(60), Some(3)), Some(RetireReason::Expiry));
        // The peer's certificate nearer its end than ours.
        let c = conn(valid(0, 1000), valid(0, 40), 1);
        assert_eq!(c.retire_at(), Some(at(30)));
        assert_eq!(c.close_at(), Some(at(39)));
        assert_eq!(c.retire(at(30), Some(3)), Some(RetireReason::Expiry));
    }

    #[test]
    fn a_connection_opened_inside_the_margin_is_only_closed_at_expiry() {
        // Opened at 70 s with our certificate ending at 80 s: a new
        // connection would present the same certificate, so no churn.
        let c = conn(valid(0, 80), None, 70);
        assert_eq!(c.retire_at(), None);
        assert_eq!(c.retire(at(75), Some(3)), None);
        assert_eq!(c.close_at(), Some(at(79)));
        // But a rotation still retires it.
        assert_eq!(c.retire(at(75), Some(4)), Some(RetireReason::Rotation));
    }

    #[test]
    fn without_certificates_nothing_expires() {
        let c = conn(None, None, 0);
        assert_eq!(
            (c.expires(), c.retire_at(), c.close_at()),
            (None, None, None)
        );
        assert_eq!(c.retire(at(1 << 30), Some(3)), None);
    }
}
