//! Prometheus metrics of the tunnel, under `mesh_tunnel_`.

use prometheus_client::{
    encoding::{EncodeLabelSet, EncodeLabelValue, LabelValueEncoder},
    metrics::{
        counter::Counter,
        family::Family,
        gauge::Gauge,
        histogram::{Histogram, exponential_buckets},
    },
    registry::{Registry, Unit},
};

/// Which side of the tunnel: `outbound` dials peers, `inbound` serves :15008.
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Direction {
    Outbound,
    Inbound,
}

impl Direction {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Outbound => "outbound",
            Self::Inbound => "inbound",
        }
    }
}

impl EncodeLabelValue for Direction {
    fn encode(&self, encoder: &mut LabelValueEncoder) -> Result<(), std::fmt::Error> {
        EncodeLabelValue::encode(&self.as_str(), encoder)
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DirectionLabels {
    pub direction: Direction,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct FailureLabels {
    pub direction: Direction,
    pub reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RejectLabels {
    pub direction: Direction,
    pub reason: &'static str,
    /// The HTTP status answered (inbound) or received (outbound); 0 when
    /// the stream failed before any status.
    pub status: u16,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabels {
    pub reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ServiceLabels {
    pub service: String,
}

#[derive(Clone, Debug)]
pub struct TunnelMetrics {
    pub(crate) handshakes: Family<DirectionLabels, Counter>,
    pub(crate) handshake_failures: Family<FailureLabels, Counter>,
    pub(crate) connections_opened: Family<DirectionLabels, Counter>,
    pub(crate) connections_active: Family<DirectionLabels, Gauge>,
    pub(crate) connections_dropped: Family<FailureLabels, Counter>,
    pub(crate) connections_retired: Family<FailureLabels, Counter>,
    pub(crate) streams_active: Family<DirectionLabels, Gauge>,
    pub(crate) streams: Family<DirectionLabels, Counter>,
    pub(crate) streams_rejected: Family<RejectLabels, Counter>,
    pub(crate) streams_revoked: Family<ReasonLabels, Counter>,
    pub(crate) service_streams: Family<ServiceLabels, Counter>,
    pub(crate) bytes_sent: Family<DirectionLabels, Counter>,
    pub(crate) bytes_received: Family<DirectionLabels, Counter>,
    pub(crate) stream_setup: Histogram,
}

impl TunnelMetrics {
    pub fn new(registry: &mut Registry) -> Self {
        let metrics = Self::unregistered();
        let r = registry.sub_registry_with_prefix("mesh_tunnel");
        r.register(
            "handshakes",
            "TLS + HTTP/2 handshakes completed",
            metrics.handshakes.clone(),
        );
        r.register(
            "handshake_failures",
            "TLS + HTTP/2 handshakes that failed, by reason",
            metrics.handshake_failures.clone(),
        );
        r.register(
            "connections_opened",
            "Tunnel connections established",
            metrics.connections_opened.clone(),
        );
        r.register(
            "connections_active",
            "Tunnel connections open now",
            metrics.connections_active.clone(),
        );
        r.register(
            "connections_dropped",
            "Tunnel connections that ended other than by a clean close, by reason",
            metrics.connections_dropped.clone(),
        );
        r.register(
            "connections_retired",
            "Tunnel connections that stopped taking new streams ahead of their certificates, by reason (rotation: this node's credentials changed; expiry: a certificate nears its notAfter)",
            metrics.connections_retired.clone(),
        );
        r.register(
            "streams_active",
            "CONNECT streams carrying a client connection now",
            metrics.streams_active.clone(),
        );
        r.register(
            "streams",
            "CONNECT streams established (answered 200)",
            metrics.streams.clone(),
        );
        r.register(
            "streams_rejected",
            "CONNECT streams refused or failed before 200, by reason and status",
            metrics.streams_rejected.clone(),
        );
        r.register(
            "streams_revoked",
            "Open inbound streams closed because a new policy denies them, by reason",
            metrics.streams_revoked.clone(),
        );
        r.register(
            "service_streams",
            "Inbound streams admitted, by the destination service whose policy admitted them",
            metrics.service_streams.clone(),
        );
        r.register_with_unit(
            "sent",
            "Payload bytes written into the tunnel",
            Unit::Bytes,
            metrics.bytes_sent.clone(),
        );
        r.register_with_unit(
            "received",
            "Payload bytes read out of the tunnel",
            Unit::Bytes,
            metrics.bytes_received.clone(),
        );
        // No unit in the registration: strict OpenMetrics parsers refuse a
        // histogram with one; the name says seconds.
        r.register(
            "stream_setup_seconds",
            "Outbound: from handle() to the 200 answer",
            metrics.stream_setup.clone(),
        );
        metrics
    }

    /// Metrics that no registry exports (tests, tools).
    pub fn unregistered() -> Self {
        Self {
            handshakes: Family::default(),
            handshake_failures: Family::default(),
            connections_opened: Family::default(),
            connections_active: Family::default(),
            connections_dropped: Family::default(),
            connections_retired: Family::default(),
            streams_active: Family::default(),
            streams: Family::default(),
            streams_rejected: Family::default(),
            streams_revoked: Family::default(),
            service_streams: Family::default(),
            bytes_sent: Family::default(),
            bytes_received: Family::default(),
            // 50 µs .. about 3.3 s.
            stream_setup: Histogram::new(exponential_buckets(50e-6, 2.0, 17)),
        }
    }

    pub(crate) fn handshake_failed(&self, direction: Direction, reason: &'static str) {
        self.handshake_failures
            .get_or_create(&FailureLabels { direction, reason })
            .inc();
    }

    pub(crate) fn rejected(&self, direction: Direction, reason: &'static str, status: u16) {
        self.streams_rejected
            .get_or_create(&RejectLabels {
                direction,
                reason,
                status,
            })
            .inc();
    }

    pub(crate) fn revoked(&self, reason: &'static str) {
        self.streams_revoked
            .get_or_create(&ReasonLabels { reason })
            .inc();
    }

    pub(crate) fn admitted(&self, service: &str) {
        self.service_streams
            .get_or_create(&ServiceLabels {
                service: service.to_owned(),
            })
            .inc();
    }

    pub(crate) fn dropped(&self, direction: Direction, reason: &'static str) {
        self.connections_dropped
            .get_or_create(&FailureLabels { direction, reason })
            .inc();
    }

    pub(crate) fn retired(&self, direction: Direction, reason: &'static str) {
        self.connections_retired
            .get_or_create(&FailureLabels { direction, reason })
            .inc();
    }

    /// The two byte counters of `direction`, cloned once per stream.
    pub(crate) fn byte_counters(&self, direction: Direction) -> (Counter, Counter) {
        let labels = DirectionLabels { direction };
        (
            self.bytes_sent.get_or_create(&labels).clone(),
            self.bytes_received.get_or_create(&labels).clone(),
        )
    }

    pub(crate) fn gauge(family: &Family<DirectionLabels, Gauge>, direction: Direction) -> Gauge {
        family.get_or_create(&DirectionLabels { direction }).clone()
    }

    pub(crate) fn counter(
        family: &Family<DirectionLabels, Counter>,
        direction: Direction,
    ) -> Counter {
        family.get_or_create(&DirectionLabels { direction }).clone()
    }

    // Read-backs for tests and `meshctl`.

    pub fn connections_opened(&self, direction: Direction) -> u64 {
        self.connections_opened
            .get_or_create(&DirectionLabels { direction })
            .get()
    }

    pub fn handshakes(&self, direction: Direction) -> u64 {
        self.handshakes
            .get_or_create(&DirectionLabels { direction })
            .get()
    }

    pub fn handshake_failures(&self, direction: Direction, reason: &'static str) -> u64 {
        self.handshake_failures
            .get_or_create(&FailureLabels { direction, reason })
            .get()
    }

    pub fn rejections(&self, direction: Direction, reason: &'static str, status: u16) -> u64 {
        self.streams_rejected
            .get_or_create(&RejectLabels {
                direction,
                reason,
                status,
            })
            .get()
    }

    pub fn streams_revoked(&self, reason: &'static str) -> u64 {
        self.streams_revoked
            .get_or_create(&ReasonLabels { reason })
            .get()
    }

    pub fn connections_dropped(&self, direction: Direction, reason: &'static str) -> u64 {
        self.connections_dropped
            .get_or_create(&FailureLabels { direction, reason })
            .get()
    }

    pub fn connections_retired(&self, direction: Direction, reason: &'static str) -> u64 {
        self.connections_retired
            .get_or_create(&FailureLabels { direction, reason })
            .get()
    }

    pub fn streams_active(&self, direction: Direction) -> i64 {
        self.streams_active
            .get_or_create(&DirectionLabels { direction })
            .get()
    }

    pub fn connections_active(&self, direction: Direction) -> i64 {
        self.connections_active
            .get_or_create(&DirectionLabels { direction })
            .get()
    }

    pub fn bytes_sent(&self, direction: Direction) -> u64 {
        self.bytes_sent
            .get_or_create(&DirectionLabels { direction })
            .get()
    }

    pub fn bytes_received(&self, direction: Direction) -> u64 {
        self.bytes_received
            .get_or_create(&DirectionLabels { direction })
            .get()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use prometheus_client::encoding::text::encode;

    #[test]
    fn families_are_registered_under_the_prefix() {
        let mut registry = Registry::default();
        let metrics = TunnelMetrics::new(&mut registry);
        metrics.handshake_failed(Direction::Inbound, "tls");
        metrics.rejected(Direction::Inbound, "not_local_backend", 400);
        metrics.byte_counters(Direction::Outbound).0.inc_by(5);
        let mut text = String::new();
        encode(&mut text, &registry).unwrap();
        for line in [
            "mesh_tunnel_handshake_failures_total{direction=\"inbound\",reason=\"tls\"} 1",
            "mesh_tunnel_streams_rejected_total{direction=\"inbound\",reason=\"not_local_backend\",status=\"400\"} 1",
            "mesh_tunnel_sent_bytes_total{direction=\"outbound\"} 5",
            "# TYPE mesh_tunnel_stream_setup_seconds histogram",
        ] {
            assert!(text.contains(line), "missing {line:?} in\n{text}");
        }
    }
}
