//! The client-connection family: connections accepted, open and refused per HTTP listener, and
//! those closed before a request could be routed.

use super::{counter, gauge, PROTOCOL_ERROR_KINDS};
use prometheus::{IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Registry};

pub struct ListenerFamily {
    accepted: IntCounterVec,
    open: IntGaugeVec,
    refused: IntCounterVec,
    protocol_errors: IntCounterVec,
    headers_dropped: IntCounterVec,
}

impl ListenerFamily {
    pub(super) fn register(r: &Registry) -> ListenerFamily {
        ListenerFamily {
            accepted: counter(r, "sidelight_downstream_connections_total", "Client connections accepted.", &["listener"]),
            open: gauge(r, "sidelight_downstream_connections_open", "Client connections currently open.", &["listener"]),
            refused: counter(r, "sidelight_downstream_connections_refused_total", "Client connections closed on arrival because limits.max_client_connections were open on the listener.", &["listener"]),
            protocol_errors: counter(r, "sidelight_downstream_protocol_errors_total", "Client connections closed for a malformed or oversized request head, or none within limits.header_read_timeout.", &["listener", "kind"]),
            headers_dropped: counter(r, "sidelight_request_headers_dropped_total", "Request header fields dropped because their names have an underscore (limits.allow_underscores_in_headers is off).", &["listener"]),
        }
    }

    /// One listener's handles; every series exists (at zero) from here on.
    pub fn listener(&self, listener: &str) -> ListenerMetrics {
        let [bad_request, headers_too_large, header_timeout] = PROTOCOL_ERROR_KINDS
            .map(|kind| self.protocol_errors.with_label_values(&[listener, kind]));
        ListenerMetrics {
            accepted: self.accepted.with_label_values(&[listener]),
            open: self.open.with_label_values(&[listener]),
            refused: self.refused.with_label_values(&[listener]),
            headers_dropped: self.headers_dropped.with_label_values(&[listener]),
            errors: ProtocolErrors {
                bad_request,
                headers_too_large,
                header_timeout,
            },
        }
    }
}

#[derive(Clone)]
pub struct ListenerMetrics {
    pub accepted: IntCounter,
    pub open: IntGauge,
    pub refused: IntCounter,
    pub headers_dropped: IntCounter,
    pub errors: ProtocolErrors,
}

/// The listener's counters of connections closed before a request could be routed.
#[derive(Clone)]
pub struct ProtocolErrors {
    pub bad_request: IntCounter,
    pub headers_too_large: IntCounter,
    pub header_timeout: IntCounter,
}
