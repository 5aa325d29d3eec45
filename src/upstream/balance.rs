//! Choosing an endpoint: power of two choices on the fewest requests in flight, skipping
//! endpoints that told us to back off (an upstream 429 with `Retry-After`). The state is shared
//! by every worker, so all of them see the same load and the same back-off.

use crate::config::UpstreamConfig;
use crate::metrics::balancer::EndpointMetrics;
use crate::metrics::Metrics;
use prometheus::IntCounter;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

struct EndpointState {
    /// `host:port`, as in metric labels and `/status`.
    label: String,
    in_flight: AtomicUsize,
    /// Consecutive failures (connect errors, resets, 5xx) since the last success.
    failures: AtomicU64,
    /// How many times this endpoint was ejected: each ejection lasts longer.
    ejections: AtomicU64,
    /// Milliseconds since `Balancer::epoch` until which outlier detection keeps it out.
    ejected_until_ms: AtomicU64,
    /// Milliseconds since `Balancer::epoch` until which it rests after a 429.
    resting_until_ms: AtomicU64,
    /// What active health checks last concluded (true when there are none).
    active_healthy: AtomicBool,
    /// Recent response time in microseconds (EWMA), for latency-weighted balancing.
    ewma_us: AtomicU64,
    metrics: EndpointMetrics,
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

/// How one request to an endpoint went, for outlier detection and latency weighting.
#[derive(Clone, Copy, Debug)]
pub enum EndpointOutcome {
    /// Response headers arrived after this long, with a status that is not a 5xx.
    Success(Duration),
    /// A 5xx after this long: counts toward ejection, and its latency is still real.
    ServerError(Duration),
    /// Connect error or reset: no response at all.
    Failure,
}

/// One endpoint as `/status` shows it.
#[derive(Debug, Clone, serde::Serialize)]
pub struct EndpointStatus {
    pub endpoint: String,
    /// Passes active health checks and is not ejected.
    pub healthy: bool,
    pub active_check: &'static str,
    pub ejected: bool,
    pub ejected_for_ms: u64,
    pub ejections: u64,
    pub resting_for_ms: u64,
    pub consecutive_failures: u64,
    pub in_flight: usize,
    pub latency_ewma_ms: f64,
}

pub struct Balancer {
    endpoints: Vec<EndpointState>,
    epoch: Instant,
    seed: AtomicU64,
    cooldowns: IntCounter,
    outliers: Outliers,
    ejections: IntCounter,
    latency_weighted: bool,
    has_active_checks: AtomicBool,
}

impl Balancer {
    /// `endpoints`: label and metrics of each endpoint, in endpoint order.
    /// The balancer of one upstream, with its per-endpoint series resolved here.
    pub fn for_upstream(u: &UpstreamConfig, metrics: &Metrics) -> Arc<Balancer> {
        let endpoints = u
            .endpoints
            .iter()
            .map(|e| {
                let endpoint = super::Upstream::endpoint_label(&e.value);
                let m = metrics.balancer.endpoint(&u.name, &endpoint);
                (endpoint, m)
            })
            .collect();
        let o = &u.outlier_detection;
        let counters = metrics.balancer.upstream(&u.name);
        Self::new(
            endpoints,
            counters.cooldowns,
            Outliers {
                consecutive_failures: o.consecutive_failures,
                base_ejection: o.base_ejection_time,
                max_ejected_percent: o.max_ejected_percent,
            },
            counters.ejections,
            u.load_balancing.latency_weighted,
        )
    }

    pub fn new(
        endpoints: Vec<(String, EndpointMetrics)>,
        cooldowns: IntCounter,
        outliers: Outliers,
        ejections: IntCounter,
        latency_weighted: bool,
    ) -> Arc<Balancer> {
        Arc::new(Balancer {
            endpoints: endpoints
                .into_iter()
                .map(|(label, metrics)| {
                    metrics.healthy.set(1);
                    EndpointState {
                        label,
                        in_flight: AtomicUsize::new(0),
                        failures: AtomicU64::new(0),
                        ejections: AtomicU64::new(0),
                        ejected_until_ms: AtomicU64::new(0),
                        resting_until_ms: AtomicU64::new(0),
                        active_healthy: AtomicBool::new(true),
                        ewma_us: AtomicU64::new(0),
                        metrics,
                    }
                })
                .collect(),
            epoch: Instant::now(),
            seed: AtomicU64::new(0x853c_49e6_748f_ea9b),
            cooldowns,
            outliers,
            ejections,
            latency_weighted,
            has_active_checks: AtomicBool::new(false),
        })
    }

    pub fn len(&self) -> usize {
        self.endpoints.len()
    }

    pub fn is_empty(&self) -> bool {
        self.endpoints.is_empty()
    }

    /// Records how a request to endpoint `i` went; enough failures in a row eject it.
    pub fn record(&self, i: usize, outcome: EndpointOutcome) {
        let Some(e) = self.endpoints.get(i) else {
            return;
        };
        let latency = match outcome {
            EndpointOutcome::Success(d) | EndpointOutcome::ServerError(d) => Some(d),
            EndpointOutcome::Failure => None,
        };
        if let Some(d) = latency {
            e.metrics.response_time.observe(d.as_secs_f64());
            if self.latency_weighted {
                // EWMA with weight 1/5 for the new sample; a racy update only loses a sample.
                let sample = u64::try_from(d.as_micros()).unwrap_or(u64::MAX / 8).max(1);
                let old = e.ewma_us.load(Ordering::Relaxed);
                let new = if old == 0 {
                    sample
                } else {
                    (old * 4 + sample) / 5
                };
                e.ewma_us.store(new, Ordering::Relaxed);
            }
        }
        if let EndpointOutcome::Success(_) = outcome {
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
        let out = (0..n).filter(|&j| !self.healthy_at(j, now)).count();
        let allowed = (n * usize::from(o.max_ejected_percent) / 100).min(n.saturating_sub(1));
        if !self.healthy_at(i, now) || out >= allowed {
            return;
        }
        let times = e.ejections.fetch_add(1, Ordering::Relaxed) + 1;
        let length = o.base_ejection * u32::try_from(times.min(10)).unwrap_or(10);
        e.failures.store(0, Ordering::Relaxed);
        e.ejected_until_ms
            .fetch_max(now + millis(length), Ordering::Relaxed);
        e.metrics.ejected.set(1);
        e.metrics.healthy.set(0);
        self.ejections.inc();
        tracing::warn!(
            endpoint = %e.label,
            failures,
            ejection_ms = length.as_millis() as u64,
            "endpoint ejected after consecutive failures"
        );
    }

    /// What active health checks concluded about endpoint `i`.
    pub fn set_active_health(&self, i: usize, healthy: bool) {
        let Some(e) = self.endpoints.get(i) else {
            return;
        };
        self.has_active_checks.store(true, Ordering::Relaxed);
        if e.active_healthy.swap(healthy, Ordering::Relaxed) != healthy {
            self.healthy_at(i, self.now_ms());
        }
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

    /// A random duration in `0..=max` (full jitter for retry backoff).
    pub fn jitter(&self, max: Duration) -> Duration {
        let unit = (self.random() >> 11) as f64 / (1u64 << 53) as f64;
        max.mul_f64(unit)
    }

    fn now_ms(&self) -> u64 {
        u64::try_from(self.epoch.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    /// Passes active checks and is not ejected; keeps the gauges in step (ejections end lazily).
    fn healthy_at(&self, i: usize, now: u64) -> bool {
        let e = &self.endpoints[i];
        let ejected = e.ejected_until_ms.load(Ordering::Relaxed) > now;
        if !ejected && e.metrics.ejected.get() != 0 {
            e.metrics.ejected.set(0);
        }
        let healthy = !ejected && e.active_healthy.load(Ordering::Relaxed);
        let shown = i64::from(healthy);
        if e.metrics.healthy.get() != shown {
            e.metrics.healthy.set(shown);
        }
        healthy
    }

    /// Healthy and not resting after a 429: may take a request now.
    fn ready(&self, i: usize, now: u64) -> bool {
        self.healthy_at(i, now) && self.endpoints[i].resting_until_ms.load(Ordering::Relaxed) <= now
    }

    /// The balancer's cost of sending one more request to `i`: requests in flight, times the
    /// recent response time when latency-weighted.
    fn cost(&self, i: usize) -> u64 {
        let e = &self.endpoints[i];
        let load = e.in_flight.load(Ordering::Relaxed) as u64;
        if self.latency_weighted {
            (load + 1).saturating_mul(e.ewma_us.load(Ordering::Relaxed).max(1))
        } else {
            load
        }
    }

    /// The endpoint for a first attempt (the tests' shorthand).
    #[cfg(test)]
    fn pick(&self) -> usize {
        self.pick_avoiding(0)
    }

    /// The endpoint for the next request, avoiding those whose bit is set in `tried` (a retry
    /// goes elsewhere) unless every endpoint is in it.
    pub fn pick_avoiding(&self, tried: u64) -> usize {
        let n = self.endpoints.len();
        if n <= 1 {
            return 0;
        }
        let now = self.now_ms();
        let fresh = |i: usize| untried(tried, i);
        let r = self.random();
        let a = (r % n as u64) as usize;
        let mut b = ((r >> 32) % (n as u64 - 1)) as usize;
        if b >= a {
            b += 1;
        }
        let cheaper = |a: usize, b: usize| if self.cost(b) < self.cost(a) { b } else { a };
        let usable = |i: usize| fresh(i) && self.ready(i, now);
        match (usable(a), usable(b)) {
            (true, true) => cheaper(a, b),
            (true, false) => a,
            (false, true) => b,
            // Neither: any usable endpoint; else an untried one; else the cheaper of the two
            // (with every endpoint down, trying one beats refusing, as Envoy's panic mode).
            (false, false) => (0..n)
                .map(|k| (a + k) % n)
                .find(|&i| usable(i))
                .or_else(|| (0..n).map(|k| (a + k) % n).find(|&i| fresh(i)))
                .unwrap_or_else(|| cheaper(a, b)),
        }
    }

    /// Whether some endpoint outside `tried` could take a request now.
    pub fn has_ready_besides(&self, tried: u64) -> bool {
        let now = self.now_ms();
        (0..self.endpoints.len()).any(|i| untried(tried, i) && self.ready(i, now))
    }

    /// Whether at least one endpoint passes its health checks and is not ejected. Looks at every
    /// endpoint, so each one's gauges are up to date afterwards (an ejection that ends is
    /// otherwise only noticed by the next pick).
    pub fn any_healthy(&self) -> bool {
        let now = self.now_ms();
        (0..self.endpoints.len()).fold(false, |any, i| self.healthy_at(i, now) | any)
    }

    /// Every endpoint's state, for `/status`.
    pub fn status(&self) -> Vec<EndpointStatus> {
        let now = self.now_ms();
        let active = self.has_active_checks.load(Ordering::Relaxed);
        self.endpoints
            .iter()
            .enumerate()
            .map(|(i, e)| {
                let ejected_for = e
                    .ejected_until_ms
                    .load(Ordering::Relaxed)
                    .saturating_sub(now);
                EndpointStatus {
                    endpoint: e.label.clone(),
                    healthy: self.healthy_at(i, now),
                    active_check: match (active, e.active_healthy.load(Ordering::Relaxed)) {
                        (false, _) => "off",
                        (true, true) => "passing",
                        (true, false) => "failing",
                    },
                    ejected: ejected_for > 0,
                    ejected_for_ms: ejected_for,
                    ejections: e.ejections.load(Ordering::Relaxed),
                    resting_for_ms: e
                        .resting_until_ms
                        .load(Ordering::Relaxed)
                        .saturating_sub(now),
                    consecutive_failures: e.failures.load(Ordering::Relaxed),
                    in_flight: e.in_flight.load(Ordering::Relaxed),
                    latency_ewma_ms: e.ewma_us.load(Ordering::Relaxed) as f64 / 1000.0,
                }
            })
            .collect()
    }

    /// Counts a request at endpoint `i` until the returned guard is dropped.
    pub fn enter(self: &Arc<Self>, i: usize) -> EndpointInFlight {
        let e = &self.endpoints[i];
        e.in_flight.fetch_add(1, Ordering::Relaxed);
        e.metrics.in_flight.inc();
        EndpointInFlight {
            balancer: self.clone(),
            index: i,
        }
    }

    /// Stops using endpoint `i` for `wait` (it answered 429).
    pub fn cool_down(&self, i: usize, wait: Duration) {
        let Some(e) = self.endpoints.get(i) else {
            return;
        };
        e.resting_until_ms
            .fetch_max(self.now_ms() + millis(wait), Ordering::Relaxed);
        self.cooldowns.inc();
    }
}

/// Whether endpoint `i` is outside the `tried` bitmask (endpoints past 64 are not tracked, so
/// always count as untried).
fn untried(tried: u64, i: usize) -> bool {
    i >= 64 || tried & (1 << i) == 0
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX / 2)
}

/// A request in flight at an endpoint.
pub struct EndpointInFlight {
    balancer: Arc<Balancer>,
    index: usize,
}

impl Drop for EndpointInFlight {
    fn drop(&mut self) {
        let e = &self.balancer.endpoints[self.index];
        e.in_flight.fetch_sub(1, Ordering::Relaxed);
        e.metrics.in_flight.dec();
    }
}

impl crate::http::body::BodyObserver for EndpointInFlight {}

/// The endpoints a request has already tried (a bit each; endpoints past 64 are not tracked),
/// shared between the retry layer, which puts it in the request, and the forwarder, which
/// picks an endpoint outside it and adds its choice.
#[derive(Clone, Default, Debug)]
pub struct TriedEndpoints(Arc<AtomicU64>);

impl TriedEndpoints {
    pub fn mask(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }

    pub fn add(&self, i: usize) {
        if i < 64 {
            self.0.fetch_or(1 << i, Ordering::Relaxed);
        }
    }
}

/// How long an upstream's 429 asks us to wait: `retry-after-ms`, `retry-after` (seconds), or
/// OpenAI's `x-ratelimit-reset-requests` (`1s`, `6m0s`, `20ms`); 1 s when it does not say;
/// at most 5 minutes.
pub fn backoff_from(headers: &http::HeaderMap) -> Duration {
    requested_wait(headers).unwrap_or(Duration::from_secs(1))
}

/// The wait an upstream asked for in its headers, if it named one (at most 5 minutes).
pub fn requested_wait(headers: &http::HeaderMap) -> Option<Duration> {
    let text = |name: &str| headers.get(name).and_then(|v| v.to_str().ok());
    let wait = text("retry-after-ms")
        .and_then(|v| v.trim().parse::<f64>().ok())
        .map(|ms| Duration::from_secs_f64(ms.max(0.0) / 1000.0))
        .or_else(|| {
            text("retry-after")
                .and_then(|v| v.trim().parse::<f64>().ok())
                .map(|s| Duration::from_secs_f64(s.max(0.0)))
        })
        .or_else(|| text("x-ratelimit-reset-requests").and_then(go_duration))?;
    Some(wait.min(Duration::from_secs(300)))
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

    fn build(n: usize, latency_weighted: bool) -> Arc<Balancer> {
        let metrics = crate::metrics::Metrics::new();
        let endpoints = (0..n)
            .map(|i| {
                let label = format!("e{i}:80");
                (label.clone(), metrics.balancer.endpoint("u", &label))
            })
            .collect();
        let counters = metrics.balancer.upstream("u");
        Balancer::new(
            endpoints,
            counters.cooldowns,
            outliers(),
            counters.ejections,
            latency_weighted,
        )
    }

    fn balancer(n: usize) -> Arc<Balancer> {
        build(n, false)
    }

    const FAIL: EndpointOutcome = EndpointOutcome::Failure;
    const OK: EndpointOutcome = EndpointOutcome::Success(Duration::from_millis(1));

    #[test]
    fn consecutive_failures_eject_within_the_share() {
        let b = balancer(4);
        b.record(0, FAIL);
        b.record(0, FAIL);
        b.record(0, OK); // a success resets the count
        b.record(0, FAIL);
        b.record(0, FAIL);
        for _ in 0..100 {
            let _ = b.pick();
        }
        b.record(0, FAIL); // third in a row: ejected
        for _ in 0..200 {
            assert_ne!(b.pick(), 0);
        }
        for _ in 0..3 {
            b.record(1, FAIL);
        }
        // Two of four are ejected (50%): a third endpoint is not.
        for _ in 0..3 {
            b.record(2, FAIL);
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
            b.record(0, FAIL);
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
    fn retries_avoid_tried_endpoints() {
        let b = balancer(3);
        for _ in 0..200 {
            let i = b.pick_avoiding(0b001);
            assert_ne!(i, 0);
            assert_eq!(b.pick_avoiding(0b011), 2);
        }
        // Everything tried: still an answer.
        assert!(b.pick_avoiding(0b111) < 3);
        assert!(b.has_ready_besides(0b011));
        b.cool_down(2, Duration::from_secs(60));
        assert!(!b.has_ready_besides(0b011));
    }

    #[test]
    fn active_health_takes_endpoints_out_and_back() {
        let b = balancer(2);
        b.set_active_health(0, false);
        for _ in 0..100 {
            assert_eq!(b.pick(), 1);
        }
        assert!(b.any_healthy());
        assert_eq!(b.status()[0].active_check, "failing");
        assert!(!b.status()[0].healthy);
        b.set_active_health(1, false);
        assert!(!b.any_healthy());
        b.set_active_health(0, true);
        assert!(b.any_healthy());
        for _ in 0..100 {
            assert_eq!(b.pick(), 0);
        }
    }

    #[test]
    fn latency_weighting_prefers_the_faster_endpoint() {
        let b = build(2, true);
        for _ in 0..20 {
            b.record(0, EndpointOutcome::Success(Duration::from_millis(100)));
            b.record(1, EndpointOutcome::Success(Duration::from_millis(10)));
        }
        // Endpoint 1 is 10x faster: even with 5 requests in flight it is cheaper.
        let _busy: Vec<_> = (0..5).map(|_| b.enter(1)).collect();
        for _ in 0..100 {
            assert_eq!(b.pick(), 1);
        }
        // Unweighted, the in-flight count decides.
        let plain = balancer(2);
        let _busy: Vec<_> = (0..5).map(|_| plain.enter(1)).collect();
        assert_eq!(plain.pick(), 0);
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
