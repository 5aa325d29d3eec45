//! The balancer family: endpoints of each upstream (in flight, response time, ejections,
//! health), active health checks, and whether each route has a healthy endpoint.

use super::{counter, gauge, histogram, LATENCY_BUCKETS};
use prometheus::Registry;
use prometheus::{Histogram, HistogramVec, IntCounter, IntCounterVec, IntGauge, IntGaugeVec};

pub struct BalancerFamily {
    in_flight: IntGaugeVec,
    cooldowns: IntCounterVec,
    ejected: IntGaugeVec,
    ejections: IntCounterVec,
    healthy: IntGaugeVec,
    route_healthy: IntGaugeVec,
    response: HistogramVec,
    health_checks: IntCounterVec,
}

impl BalancerFamily {
    pub(super) fn register(r: &Registry) -> BalancerFamily {
        BalancerFamily {
            in_flight: gauge(r, "sidelight_endpoint_requests_in_flight", "Requests in flight at each endpoint (what the balancer compares).", &["upstream", "endpoint"]),
            cooldowns: counter(r, "sidelight_endpoint_cooldowns_total", "Times an endpoint was taken out of rotation because it answered 429 (for its Retry-After).", &["upstream"]),
            ejected: gauge(r, "sidelight_endpoint_ejected", "1 while an endpoint is ejected by outlier detection (consecutive failures).", &["upstream", "endpoint"]),
            ejections: counter(r, "sidelight_endpoint_ejections_total", "Endpoints ejected after consecutive connect errors, resets or 5xx.", &["upstream"]),
            healthy: gauge(r, "sidelight_endpoint_healthy", "1 while an endpoint passes its active health checks and is not ejected.", &["upstream", "endpoint"]),
            route_healthy: gauge(r, "sidelight_route_healthy", "1 while a route's upstream has at least one healthy endpoint; /readyz is 503 while some route has none.", &["route"]),
            response: histogram(r, "sidelight_endpoint_response_seconds", "Time from sending a request to an endpoint until its response headers.", &["upstream", "endpoint"], LATENCY_BUCKETS),
            health_checks: counter(r, "sidelight_health_checks_total", "Active health check probes, by result: success, failure (unexpected status or connection error), timeout.", &["upstream", "result"]),
        }
    }

    /// One endpoint of `upstream`, labelled `host:port`.
    pub fn endpoint(&self, upstream: &str, endpoint: &str) -> EndpointMetrics {
        let labels = [upstream, endpoint];
        EndpointMetrics {
            in_flight: self.in_flight.with_label_values(&labels),
            ejected: self.ejected.with_label_values(&labels),
            healthy: self.healthy.with_label_values(&labels),
            response_time: self.response.with_label_values(&labels),
        }
    }

    /// Counters of `upstream`'s balancer as a whole.
    pub fn upstream(&self, upstream: &str) -> BalancerCounters {
        BalancerCounters {
            cooldowns: self.cooldowns.with_label_values(&[upstream]),
            ejections: self.ejections.with_label_values(&[upstream]),
        }
    }

    /// Active health check probes of `upstream`, by result.
    pub fn health_checks(&self, upstream: &str) -> HealthCheckCounters {
        let result = |r: &str| self.health_checks.with_label_values(&[upstream, r]);
        HealthCheckCounters {
            success: result("success"),
            failure: result("failure"),
            timeout: result("timeout"),
        }
    }

    /// 1 while `route` has a healthy endpoint.
    pub fn route_healthy(&self, route: &str) -> IntGauge {
        self.route_healthy.with_label_values(&[route])
    }
}

/// The metrics of one endpoint.
pub struct EndpointMetrics {
    pub in_flight: IntGauge,
    pub ejected: IntGauge,
    pub healthy: IntGauge,
    pub response_time: Histogram,
}

pub struct BalancerCounters {
    pub cooldowns: IntCounter,
    pub ejections: IntCounter,
}

pub struct HealthCheckCounters {
    pub success: IntCounter,
    pub failure: IntCounter,
    pub timeout: IntCounter,
}
