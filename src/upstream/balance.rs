//! Choosing an endpoint: power of two choices on the fewest requests in flight, skipping
//! endpoints that told us to back off (an upstream 429 with `Retry-After`). The state is shared
//! by every worker, so all of them see the same load and the same back-off.

use prometheus::{IntCounter, IntGauge};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

struct EndpointState {
    in_flight: AtomicUsize,
    /// Consecutive failures (connect errors, resets, 5xx) since the last success.
    failures: AtomicU64,
    /// How many times this endpoint was ejected: each ejection lasts longer.
    ejections: AtomicU64,
    ejected_gauge: IntGauge,
    /// Milliseconds since `Balancer::epoch` before which the endpoint is not used.
    cooling_until_ms: AtomicU64,
    in_flight_gauge: IntGauge,
}

/// Passive health checking (outlier detection), as Envoy does it.
#[derive(Clone, Copy, Debug)]
pub struct Outliers {
    /// Consecutive failures that eject an endpoint (0: never).
    pub consecutive_failures: u64,
    /// First ejection's length; the n-th lasts n times as long (capped at 10x).
    pub base_ejection: Duration,
    /// Never eject more than this share of the endpoints (at least one stays).
    pub max_ejected_percent: u8,
}

pub struct Balancer {
    endpoints: Vec<EndpointState>,
    epoch: Instant,
    seed: AtomicU64,
    cooldowns: IntCounter,
    outliers: Outliers,
    ejections: IntCounter,
}

impl Balancer {
    /// `gauges`: per endpoint, in endpoint order, its in-flight and its ejected gauge.
    pub fn new(
        gauges: Vec<(IntGauge, IntGauge)>,
        cooldowns: IntCounter,
        outliers: Outliers,
        ejections: IntCounter,
    ) -> Arc<Balancer> {
        Arc::new(Balancer {
            endpoints: gauges
                .into_iter()
                .map(|(in_flight_gauge, ejected_gauge)| EndpointState {
                    in_flight: AtomicUsize::new(0),
                    failures: AtomicU64::new(0),
                    ejections: AtomicU64::new(0),
                    ejected_gauge,
                    cooling_until_ms: AtomicU64::new(0),
                    in_flight_gauge,
                })
                .collect(),
            epoch: Instant::now(),
            seed: AtomicU64::new(0x853c_49e6_748f_ea9b),
            cooldowns,
            outliers,
            ejections,
        })
    }

    /// Records how a request to endpoint `i` went; enough failures in a row eject it.
    pub fn record(&self, i: usize, success: bool) {
        let e = &self.endpoints[i];
        if success {
            // Read first: a store on every request would bounce the line between workers.
            if e.failures.load(Ordering::Relaxed) != 0 {
                e.failures.store(0, Ordering::Relaxed);
            }
            return;
        }
        let failures = e.failures.fetch_add(1, Ordering::Relaxed) + 1;
        let o = self.outliers;
        if o.consecutive_failures == 0 || failures < o.consecutive_failures {
            return;
        }
        let now = self.now_ms();
        let n = self.endpoints.len();
        let ejected = (0..n).filter(|&j| !self.ready(j, now)).count();
        let allowed = (n * usize::from(o.max_ejected_percent) / 100).min(n.saturating_sub(1));
        if !self.ready(i, now) || ejected >= allowed {
            return;
        }
        let times = e.ejections.fetch_add(1, Ordering::Relaxed) + 1;
        let length = o.base_ejection * u32::try_from(times.min(10)).unwrap_or(10);
        e.failures.store(0, Ordering::Relaxed);
        e.cooling_until_ms.fetch_max(
            now + u64::try_from(length.as_millis()).unwrap_or(u64::MAX / 2),
            Ordering::Relaxed,
        );
        e.ejected_gauge.set(1);
        self.ejections.inc();
        tracing::warn!(
            endpoint = i,
            failures,
            ejection_ms = length.as_millis() as u64,
            "endpoint ejected after consecutive failures"
        );
    }

    /// splitmix64 over an atomic counter: cheap, lock-free, good enough to pick two endpoints.
    fn random(&self) -> u64 {
        let mut z = self
            .seed
            .fetch_add(0x9e37_79b9_7f4a_7c15, Ordering::Relaxed)
            .wrapping_add(0x9e37_79b9_7f4a_7c15);
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    fn now_ms(&self) -> u64 {
        u64::try_from(self.epoch.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    fn ready(&self, i: usize, now: u64) -> bool {
        let e = &self.endpoints[i];
        let ready = e.cooling_until_ms.load(Ordering::Relaxed) <= now;
        if ready && e.ejected_gauge.get() != 0 {
            e.ejected_gauge.set(0);
        }
        ready
    }

    fn load(&self, i: usize) -> usize {
        self.endpoints[i].in_flight.load(Ordering::Relaxed)
    }

    /// The endpoint for the next request.
    pub fn pick(&self) -> usize {
        let n = self.endpoints.len();
        if n <= 1 {
            return 0;
        }
        let r = self.random();
        let a = (r % n as u64) as usize;
        let mut b = ((r >> 32) % (n as u64 - 1)) as usize;
        if b >= a {
            b += 1;
        }
        let now = self.now_ms();
        let less_loaded = |a: usize, b: usize| if self.load(b) < self.load(a) { b } else { a };
        match (self.ready(a, now), self.ready(b, now)) {
            (true, true) => less_loaded(a, b),
            (true, false) => a,
            (false, true) => b,
            // Both backing off: any endpoint that is not, else the less loaded of the two.
            (false, false) => (0..n)
                .find(|&i| self.ready(i, now))
                .unwrap_or_else(|| less_loaded(a, b)),
        }
    }

    /// Counts a request at endpoint `i` until the returned guard is dropped.
    pub fn enter(self: &Arc<Self>, i: usize) -> InFlight {
        let e = &self.endpoints[i];
        e.in_flight.fetch_add(1, Ordering::Relaxed);
        e.in_flight_gauge.inc();
        InFlight {
            balancer: self.clone(),
            index: i,
        }
    }

    /// Stops using endpoint `i` for `wait`.
    pub fn cool_down(&self, i: usize, wait: Duration) {
        let until = self.now_ms() + u64::try_from(wait.as_millis()).unwrap_or(u64::MAX / 2);
        self.endpoints[i]
            .cooling_until_ms
            .fetch_max(until, Ordering::Relaxed);
        self.cooldowns.inc();
    }
}

/// A request in flight at an endpoint.
pub struct InFlight {
    balancer: Arc<Balancer>,
    index: usize,
}

impl Drop for InFlight {
    fn drop(&mut self) {
        let e = &self.balancer.endpoints[self.index];
        e.in_flight.fetch_sub(1, Ordering::Relaxed);
        e.in_flight_gauge.dec();
    }
}

impl crate::proxy::body::BodyObserver for InFlight {}

/// How long an upstream's 429 asks us to wait: `retry-after-ms`, `retry-after` (seconds), or
/// OpenAI's `x-ratelimit-reset-requests` (`1s`, `6m0s`, `20ms`); 1 s when it does not say;
/// at most 5 minutes.
pub fn backoff_from(headers: &http::HeaderMap) -> Duration {
    let text = |name: &str| headers.get(name).and_then(|v| v.to_str().ok());
    let wait = text("retry-after-ms")
        .and_then(|v| v.trim().parse::<f64>().ok())
        .map(|ms| Duration::from_secs_f64(ms.max(0.0) / 1000.0))
        .or_else(|| {
            text("retry-after")
                .and_then(|v| v.trim().parse::<f64>().ok())
                .map(|s| Duration::from_secs_f64(s.max(0.0)))
        })
        .or_else(|| text("x-ratelimit-reset-requests").and_then(go_duration))
        .unwrap_or(Duration::from_secs(1));
    wait.min(Duration::from_secs(300))
}

/// Go-style durations as OpenAI sends them: `1s`, `6m0s`, `1h2m3.5s`, `20ms`.
fn go_duration(text: &str) -> Option<Duration> {
    let mut total = 0.0;
    let mut rest = text.trim();
    if rest.is_empty() {
        return None;
    }
    while !rest.is_empty() {
        let split = rest.find(|c: char| !(c.is_ascii_digit() || c == '.'))?;
        let (num, tail) = rest.split_at(split);
        let value: f64 = num.parse().ok()?;
        let unit_len = tail
            .find(|c: char| c.is_ascii_digit())
            .unwrap_or(tail.len());
        let (unit, tail) = tail.split_at(unit_len);
        total += value
            * match unit {
                "h" => 3600.0,
                "m" => 60.0,
                "s" => 1.0,
                "ms" => 0.001,
                _ => return None,
            };
        rest = tail;
    }
    Some(Duration::from_secs_f64(total))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn outliers() -> Outliers {
        Outliers {
            consecutive_failures: 3,
            base_ejection: Duration::from_secs(30),
            max_ejected_percent: 50,
        }
    }

    fn balancer(n: usize) -> Arc<Balancer> {
        let gauges = (0..n)
            .map(|i| {
                (
                    IntGauge::new(format!("g{i}"), "test").unwrap(),
                    IntGauge::new(format!("e{i}"), "test").unwrap(),
                )
            })
            .collect();
        Balancer::new(
            gauges,
            IntCounter::new("c", "test").unwrap(),
            outliers(),
            IntCounter::new("x", "test").unwrap(),
        )
    }

    #[test]
    fn consecutive_failures_eject_within_the_share() {
        let b = balancer(4);
        b.record(0, false);
        b.record(0, false);
        b.record(0, true); // a success resets the count
        b.record(0, false);
        b.record(0, false);
        for _ in 0..100 {
            let _ = b.pick();
        }
        b.record(0, false); // third in a row: ejected
        for _ in 0..200 {
            assert_ne!(b.pick(), 0);
        }
        for _ in 0..3 {
            b.record(1, false);
        }
        // Two of four are ejected (50%): a third endpoint is not.
        for _ in 0..3 {
            b.record(2, false);
        }
        let picks: std::collections::HashSet<usize> = (0..300).map(|_| b.pick()).collect();
        assert!(
            picks.contains(&2) && picks.contains(&3) && !picks.contains(&0) && !picks.contains(&1),
            "{picks:?}"
        );
    }

    #[test]
    fn a_single_endpoint_is_never_ejected() {
        let b = balancer(1);
        for _ in 0..10 {
            b.record(0, false);
        }
        assert_eq!(b.pick(), 0);
        assert_eq!(b.endpoints[0].ejections.load(Ordering::Relaxed), 0);
    }

    #[test]
    fn prefers_the_less_loaded_endpoint() {
        let b = balancer(2);
        let _busy = b.enter(0);
        for _ in 0..100 {
            assert_eq!(b.pick(), 1);
        }
    }

    #[test]
    fn spreads_load_evenly_when_idle() {
        let b = balancer(3);
        let mut counts = [0; 3];
        for _ in 0..3000 {
            counts[b.pick()] += 1;
        }
        assert!(counts.iter().all(|&c| c > 800), "{counts:?}");
    }

    #[test]
    fn skips_endpoints_that_back_off() {
        let b = balancer(3);
        b.cool_down(1, Duration::from_secs(60));
        for _ in 0..300 {
            assert_ne!(b.pick(), 1);
        }
        b.cool_down(0, Duration::from_secs(60));
        b.cool_down(2, Duration::from_secs(60));
        // All backing off: still answers with one of them.
        assert!(b.pick() < 3);
    }

    #[test]
    fn backoff_headers() {
        let mut h = http::HeaderMap::new();
        assert_eq!(backoff_from(&h), Duration::from_secs(1));
        h.insert("x-ratelimit-reset-requests", "6m0s".parse().unwrap());
        assert_eq!(backoff_from(&h), Duration::from_secs(300));
        h.insert("x-ratelimit-reset-requests", "1.5s".parse().unwrap());
        assert_eq!(backoff_from(&h), Duration::from_millis(1500));
        h.insert("retry-after", "20".parse().unwrap());
        assert_eq!(backoff_from(&h), Duration::from_secs(20));
        h.insert("retry-after-ms", "250".parse().unwrap());
        assert_eq!(backoff_from(&h), Duration::from_millis(250));
        assert_eq!(go_duration("20ms"), Some(Duration::from_millis(20)));
        assert_eq!(go_duration("bogus"), None);
    }
}
