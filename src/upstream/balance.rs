//! Choosing an endpoint: power of two choices on the fewest requests in flight, skipping
//! endpoints that told us to back off (an upstream 429 with `Retry-After`). The state is shared
//! by every worker, so all of them see the same load and the same back-off.

use prometheus::{IntCounter, IntGauge};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

struct EndpointState {
    in_flight: AtomicUsize,
    /// Milliseconds since `Balancer::epoch` before which the endpoint is not used.
    cooling_until_ms: AtomicU64,
    in_flight_gauge: IntGauge,
}

pub struct Balancer {
    endpoints: Vec<EndpointState>,
    epoch: Instant,
    seed: AtomicU64,
    cooldowns: IntCounter,
}

impl Balancer {
    /// `gauges`: one in-flight gauge per endpoint, in endpoint order.
    pub fn new(gauges: Vec<IntGauge>, cooldowns: IntCounter) -> Arc<Balancer> {
        Arc::new(Balancer {
            endpoints: gauges
                .into_iter()
                .map(|in_flight_gauge| EndpointState {
                    in_flight: AtomicUsize::new(0),
                    cooling_until_ms: AtomicU64::new(0),
                    in_flight_gauge,
                })
                .collect(),
            epoch: Instant::now(),
            seed: AtomicU64::new(0x853c_49e6_748f_ea9b),
            cooldowns,
        })
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
        self.endpoints[i].cooling_until_ms.load(Ordering::Relaxed) <= now
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

    fn balancer(n: usize) -> Arc<Balancer> {
        let gauges = (0..n)
            .map(|i| IntGauge::new(format!("g{i}"), "test").unwrap())
            .collect();
        Balancer::new(gauges, IntCounter::new("c", "test").unwrap())
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
