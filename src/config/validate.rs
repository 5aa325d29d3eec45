//! Semantic checks that serde cannot express. Every problem is collected (not just the first) and
//! reported with its field path, e.g. `routes[2].upstream: unknown upstream "opneai"`.

use super::{Config, EnvString, LlmConfig, RouteKind};
use std::collections::HashSet;
use std::fmt;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FieldError {
    pub path: String,
    pub message: String,
}

impl FieldError {
    pub fn new(path: impl Into<String>, message: impl Into<String>) -> Self {
        FieldError {
            path: path.into(),
            message: message.into(),
        }
    }

    pub(super) fn join(errors: &[FieldError]) -> String {
        errors
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join("\n")
    }
}

impl fmt::Display for FieldError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.path.is_empty() {
            f.write_str(&self.message)
        } else {
            write!(f, "{}: {}", self.path, self.message)
        }
    }
}

struct Errors(Vec<FieldError>);

impl Errors {
    fn add(&mut self, path: impl Into<String>, message: impl Into<String>) {
        self.0.push(FieldError::new(path, message));
    }
}

pub(super) fn validate(
    config: &mut Config,
    env: &dyn Fn(&str) -> Option<String>,
) -> Vec<FieldError> {
    let mut errs = Errors(Vec::new());
    check_listeners(config, &mut errs);
    check_log(config, &mut errs);
    if let Some(token) = &mut config.admin.token {
        if let Err(e) = expand(token, env) {
            errs.add("admin.token", e);
        } else if token
            .value
            .chars()
            .any(|c| c.is_whitespace() || c.is_control())
        {
            errs.add(
                "admin.token",
                "must not contain spaces or control characters",
            );
        }
    }
    check_upstreams(config, env, &mut errs);
    check_routes(config, &mut errs);
    errs.0
        .extend(config.postgres.validate(env, &config.http_addrs()));
    if config.runtime.workers > 256 {
        errs.add("runtime.workers", "at most 256 (0 means one per CPU)");
    }
    if config.limits.max_client_connections == 0 {
        errs.add("limits.max_client_connections", "must be at least 1");
    }
    if config.limits.max_in_flight_requests == 0 {
        errs.add("limits.max_in_flight_requests", "must be at least 1");
    }
    if config.limits.client_body_timeout.is_zero() {
        errs.add("limits.client_body_timeout", "must be more than 0s");
    }
    if config.limits.header_read_timeout.is_zero() {
        errs.add("limits.header_read_timeout", "must be more than 0s");
    }
    errs.0
}

fn check_listeners(config: &Config, errs: &mut Errors) {
    if config.listeners.is_empty() {
        errs.add("listeners", "at least one listener is required");
    }
    let mut names = HashSet::new();
    let mut addrs = HashSet::new();
    for (i, l) in config.listeners.iter().enumerate() {
        if !names.insert(l.name.as_str()) {
            errs.add(
                format!("listeners[{i}].name"),
                format!("duplicate listener name {:?}", l.name),
            );
        }
        if l.address.port() != 0 && !addrs.insert(l.address) {
            errs.add(
                format!("listeners[{i}].address"),
                format!("address {} is used twice", l.address),
            );
        }
        if l.address.port() != 0 && l.address == config.admin.address {
            errs.add(
                format!("listeners[{i}].address"),
                "same address as admin.address",
            );
        }
    }
}

fn check_log(config: &Config, errs: &mut Errors) {
    if let Err(e) = tracing_subscriber::EnvFilter::try_new(&config.log.level) {
        errs.add(
            "log.level",
            format!("invalid filter {:?}: {e}", config.log.level),
        );
    }
}

fn check_upstreams(config: &mut Config, env: &dyn Fn(&str) -> Option<String>, errs: &mut Errors) {
    let mut names = HashSet::new();
    for (i, up) in config.upstreams.iter_mut().enumerate() {
        let at = format!("upstreams[{i}]");
        if up.name.is_empty() {
            errs.add(format!("{at}.name"), "must not be empty");
        } else if !names.insert(up.name.clone()) {
            errs.add(
                format!("{at}.name"),
                format!("duplicate upstream name {:?}", up.name),
            );
        }
        if up.endpoints.is_empty() {
            errs.add(
                format!("{at}.endpoints"),
                "at least one endpoint URL is required",
            );
        }
        for (j, endpoint) in up.endpoints.iter_mut().enumerate() {
            let path = format!("{at}.endpoints[{j}]");
            if let Err(e) = expand(endpoint, env) {
                errs.add(path, e);
            } else if let Err(e) = check_endpoint_url(&endpoint.value) {
                errs.add(path, e);
            } else if has_credentials(&endpoint.value)
                && up
                    .headers
                    .keys()
                    .any(|h| h.eq_ignore_ascii_case("authorization"))
            {
                errs.add(
                    path,
                    format!("has credentials (sent as Basic auth) and {at}.headers sets authorization too: keep one"),
                );
            }
        }
        for (name, value) in up.headers.iter_mut() {
            let path = format!("{at}.headers.{name}");
            if http::HeaderName::from_bytes(name.as_bytes()).is_err() {
                errs.add(path, format!("invalid header name {name:?}"));
            } else if let Err(e) = expand(value, env) {
                errs.add(path, e);
            } else if http::HeaderValue::from_str(&value.value).is_err() {
                errs.add(path, "value contains characters not allowed in a header");
            }
        }
        let t = &up.timeouts;
        for (field, d) in [
            ("connect", t.connect),
            ("first_byte", t.first_byte),
            ("idle", t.idle),
            ("total", t.total),
        ] {
            if d.is_zero() {
                errs.add(format!("{at}.timeouts.{field}"), "must be greater than 0");
            }
        }
        if up.pool.idle_timeout.is_zero() {
            errs.add(
                format!("{at}.pool.idle_timeout"),
                "must be greater than 0 (set max_idle_per_endpoint: 0 to disable pooling)",
            );
        }
        if up.outlier_detection.max_ejected_percent > 100 {
            errs.add(
                format!("{at}.outlier_detection.max_ejected_percent"),
                "at most 100",
            );
        }
        if up
            .concurrency
            .as_ref()
            .is_some_and(|c| c.max_in_flight == 0)
        {
            errs.add(
                format!("{at}.concurrency.max_in_flight"),
                "must be at least 1",
            );
        }
        if let Some(hc) = &up.health_check {
            let at = format!("{at}.health_check");
            if hc.interval.is_zero() {
                errs.add(format!("{at}.interval"), "must be greater than 0");
            }
            if hc.timeout.is_zero() {
                errs.add(format!("{at}.timeout"), "must be greater than 0");
            }
            if hc.healthy_threshold == 0 {
                errs.add(format!("{at}.healthy_threshold"), "must be at least 1");
            }
            if hc.unhealthy_threshold == 0 {
                errs.add(format!("{at}.unhealthy_threshold"), "must be at least 1");
            }
            if let Some(p) = &hc.path {
                if !p.starts_with('/') || p.parse::<http::uri::PathAndQuery>().is_err() {
                    errs.add(
                        format!("{at}.path"),
                        format!("must be a path starting with '/', got {p:?}"),
                    );
                }
            }
            if let Some(statuses) = &hc.expected_statuses {
                if statuses.is_empty() {
                    errs.add(
                        format!("{at}.expected_statuses"),
                        "list at least one status",
                    );
                }
            }
        }
        let budget = &up.retry_budget;
        if !(0.0..=1000.0).contains(&budget.percent) {
            errs.add(
                format!("{at}.retry_budget.percent"),
                "must be between 0 and 1000",
            );
        }
        if let Some(ca) = &up.tls.ca_file {
            if let Err(e) = std::fs::metadata(ca) {
                errs.add(
                    format!("{at}.tls.ca_file"),
                    format!("cannot read {}: {e}", ca.display()),
                );
            }
        }
    }
}

fn expand(s: &mut EnvString, env: &dyn Fn(&str) -> Option<String>) -> Result<(), String> {
    s.expand(env)
}

/// `user:password@` in a URL's authority.
fn has_credentials(url: &str) -> bool {
    url.parse::<http::Uri>()
        .ok()
        .and_then(|u| u.authority().map(|a| a.as_str().contains('@')))
        .unwrap_or(false)
}

fn check_endpoint_url(url: &str) -> Result<(), String> {
    // Messages name the URL, never with its password.
    let shown = super::redact::url_password(url);
    let uri: http::Uri = url
        .parse()
        .map_err(|e| format!("invalid URL {shown:?}: {e}"))?;
    let url = shown.as_str();
    match uri.scheme_str() {
        Some("http") | Some("https") => {}
        _ => return Err(format!("URL {url:?} must start with http:// or https://")),
    }
    if uri.host().is_none_or(str::is_empty) {
        return Err(format!("URL {url:?} has no host"));
    }
    if uri.query().is_some() {
        return Err(format!("URL {url:?} must not have a query string"));
    }
    Ok(())
}

fn check_route_llm(at: &str, kind: RouteKind, llm: &LlmConfig, errs: &mut Errors) {
    if !kind.is_llm() {
        errs.add(
            at,
            "only routes of kind openai or anthropic read LLM traffic",
        );
    }
    if llm.max_models == 0 {
        errs.add(format!("{at}.max_models"), "must be at least 1");
    }
    for (field, value) in [
        ("first_token_timeout", llm.first_token_timeout),
        ("max_token_gap", llm.max_token_gap),
    ] {
        if value.is_some_and(|d| d.is_zero()) {
            errs.add(
                format!("{at}.{field}"),
                "must be more than 0 (leave it out to turn it off)",
            );
        }
    }
}

fn check_routes(config: &mut Config, errs: &mut Errors) {
    let upstream_names: Vec<String> = config.upstreams.iter().map(|u| u.name.clone()).collect();
    let listener_names: Vec<String> = config.listeners.iter().map(|l| l.name.clone()).collect();
    let mut route_names = HashSet::new();
    let mut matchers = HashSet::new();
    if config.routes.is_empty() && config.postgres.listeners.is_empty() {
        errs.add("routes", "at least one route is required");
    }
    for (i, route) in config.routes.iter_mut().enumerate() {
        let at = format!("routes[{i}]");
        if !upstream_names.contains(&route.upstream) {
            let hint = closest(&route.upstream, &upstream_names)
                .map(|n| format!(" (did you mean {n:?}?)"))
                .unwrap_or_default();
            errs.add(
                format!("{at}.upstream"),
                format!("unknown upstream {:?}{hint}", route.upstream),
            );
        }
        if route.name.is_empty() {
            route.name = route.upstream.clone();
        }
        if !route_names.insert(route.name.clone()) {
            errs.add(
                format!("{at}.name"),
                format!(
                    "duplicate route name {:?} (names label metrics; give each route its own)",
                    route.name
                ),
            );
        }
        let m = &route.matcher;
        if !m.path_prefix.starts_with('/') {
            errs.add(
                format!("{at}.match.path_prefix"),
                format!("must start with '/', got {:?}", m.path_prefix),
            );
        }
        if let Some(l) = &m.listener {
            if !listener_names.contains(l) {
                errs.add(
                    format!("{at}.match.listener"),
                    format!("unknown listener {l:?}"),
                );
            }
        }
        if let Some(h) = &m.host {
            if h.is_empty() || h.contains('/') {
                errs.add(format!("{at}.match.host"), format!("invalid host {h:?}"));
            }
        }
        let key = (
            m.path_prefix.clone(),
            m.host.clone().map(|h| h.to_ascii_lowercase()),
            m.listener.clone(),
        );
        if !matchers.insert(key) {
            errs.add(
                format!("{at}.match"),
                "an earlier route has the same match; this route would never be used",
            );
        }
        if route.strip_prefix && route.prefix_rewrite.is_some() {
            errs.add(
                format!("{at}.prefix_rewrite"),
                "set either strip_prefix or prefix_rewrite, not both",
            );
        }
        if let Some(cache) = &route.cache {
            check_route_cache(&format!("{at}.cache"), cache, errs);
        }
        if let Some(batch) = &route.batch {
            check_batch(&format!("{at}.batch"), route.kind, batch, errs);
        }
        if let Some(llm) = &route.llm {
            check_route_llm(&format!("{at}.llm"), route.kind, llm, errs);
        }
        let mut limit_names = HashSet::new();
        for (i, limit) in route.rate_limits.iter().enumerate() {
            let at = format!("{at}.rate_limits[{i}]");
            if !limit_names.insert(limit.name.clone()) {
                errs.add(
                    format!("{at}.name"),
                    format!("duplicate limit name {:?}", limit.name),
                );
            }
            if limit.unit == super::RateUnit::Tokens && !route.kind.is_llm() {
                errs.add(
                    format!("{at}.unit"),
                    "token limits need a route of kind openai or anthropic (it reads the usage)",
                );
            }
            if limit.max_keys == 0 {
                errs.add(format!("{at}.max_keys"), "must be at least 1");
            }
        }
        if let Some(retries) = &route.retries {
            let at = format!("{at}.retries");
            for (i, s) in retries.statuses.iter().flatten().enumerate() {
                if !(400..=599).contains(s) {
                    errs.add(
                        format!("{at}.statuses[{i}]"),
                        format!("{s} is not an error status (400-599)"),
                    );
                }
            }
            if retries.backoff > retries.max_backoff {
                errs.add(format!("{at}.backoff"), "must not exceed max_backoff");
            }
        }
        if let Some(p) = &route.prefix_rewrite {
            if !p.starts_with('/') {
                errs.add(
                    format!("{at}.prefix_rewrite"),
                    format!("must start with '/', got {p:?}"),
                );
            }
        }
    }
}

fn check_route_cache(at: &str, cache: &super::RouteCacheConfig, errs: &mut Errors) {
    if cache.ttl.is_zero() {
        errs.add(format!("{at}.ttl"), "must be greater than 0");
    }
    for (field, names) in [
        ("vary_headers", &cache.vary_headers),
        ("credential_headers", &cache.credential_headers),
    ] {
        for (i, h) in names.iter().enumerate() {
            if http::HeaderName::from_bytes(h.as_bytes()).is_err() {
                errs.add(
                    format!("{at}.{field}[{i}]"),
                    format!("invalid header name {h:?}"),
                );
            }
        }
    }
    for (i, rule) in cache.rules.iter().enumerate() {
        if rule.methods.is_empty() {
            errs.add(
                format!("{at}.rules[{i}].methods"),
                "at least one method is required",
            );
        }
    }
}

fn check_batch(at: &str, kind: super::RouteKind, batch: &super::BatchConfig, errs: &mut Errors) {
    if kind != super::RouteKind::Openai {
        errs.add(
            at,
            "embeddings batching needs a route of kind: openai (it reads OpenAI's embeddings format)",
        );
    }
    if batch.max_inputs == 0 {
        errs.add(format!("{at}.max_inputs"), "must be at least 1");
    } else if batch.max_inputs > 100_000 {
        errs.add(format!("{at}.max_inputs"), "at most 100000");
    }
    if batch.max_wait.is_zero() {
        errs.add(format!("{at}.max_wait"), "must be greater than 0");
    } else if batch.max_wait > std::time::Duration::from_secs(10) {
        errs.add(
            format!("{at}.max_wait"),
            "at most 10s (every request of a batch waits this long in the worst case)",
        );
    }
    if batch.max_body_bytes.is_some_and(|b| b.0 == 0) {
        errs.add(format!("{at}.max_body_bytes"), "must be at least 1");
    }
}

/// The configured name closest to a misspelt one, for "did you mean" hints.
fn closest<'a>(wanted: &str, names: &'a [String]) -> Option<&'a str> {
    names
        .iter()
        .map(|n| (edit_distance(wanted, n), n))
        .filter(|(d, n)| *d <= 2.max(n.len() / 3))
        .min_by_key(|(d, _)| *d)
        .map(|(_, n)| n.as_str())
}

fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut prev: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut cur = vec![i + 1; b.len() + 1];
        for (j, cb) in b.iter().enumerate() {
            let cost = usize::from(ca != *cb);
            cur[j + 1] = (prev[j] + cost).min(prev[j + 1] + 1).min(cur[j] + 1);
        }
        prev = cur;
    }
    prev[b.len()]
}

#[cfg(test)]
mod tests {
    use crate::config::{Config, ConfigError};

    fn errors(yaml: &str) -> Vec<String> {
        match Config::from_yaml(yaml, &|_| None) {
            Ok(_) => Vec::new(),
            Err(ConfigError::Invalid(list)) => list.iter().map(ToString::to_string).collect(),
            Err(e) => vec![e.to_string()],
        }
    }

    #[test]
    fn url_credentials_next_to_an_authorization_header_are_refused() {
        let errs = errors(
            "upstreams: [{ name: u, endpoints: [\"http://me:hunter2@127.0.0.1:1\"], headers: { Authorization: \"Bearer x\" } }]\nroutes: [{ upstream: u }]\n",
        );
        assert_eq!(
            errs,
            ["upstreams[0].endpoints[0]: has credentials (sent as Basic auth) and upstreams[0].headers sets authorization too: keep one"]
        );
        let errs = errors(
            "upstreams: [{ name: u, endpoints: [\"ftp://me:hunter2@h\"] }]\nroutes: [{ upstream: u }]\n",
        );
        assert!(
            errs.len() == 1 && !errs[0].contains("hunter2") && errs[0].contains("<redacted>"),
            "{errs:?}"
        );
    }

    #[test]
    fn admin_token() {
        let base = "upstreams: [{ name: u, endpoints: [\"http://127.0.0.1:1\"] }]\nroutes: [{ upstream: u }]\n";
        let errs = errors(&format!(
            "{base}admin: {{ token: \"${{NO_SUCH_TOKEN}}\" }}\n"
        ));
        assert!(
            errs.len() == 1
                && errs[0]
                    .starts_with("admin.token: environment variable NO_SUCH_TOKEN is not set"),
            "{errs:?}"
        );
        let errs = errors(&format!("{base}admin: {{ token: \"two words\" }}\n"));
        assert_eq!(
            errs,
            ["admin.token: must not contain spaces or control characters"]
        );
        // An empty optional token is no token.
        let config = Config::from_yaml(
            &format!("{base}admin: {{ token: \"${{T:-}}\" }}\n"),
            &|_| None,
        )
        .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(config.admin.token(), None);
        let config = Config::from_yaml(&format!("{base}admin: {{ token: hunter2 }}\n"), &|_| None)
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(config.admin.token(), Some("hunter2"));
        assert!(!config.redacted_yaml().contains("hunter2"));
    }

    #[test]
    fn llm_options_are_checked() {
        let errs = errors(
            r#"
upstreams: [{ name: u, endpoints: ["http://127.0.0.1:1"] }]
routes:
  - { name: a, upstream: u, match: { path_prefix: /a }, llm: { include_usage: true } }
  - { name: b, kind: openai, upstream: u, match: { path_prefix: /b }, llm: { max_models: 0, first_token_timeout: 0s } }
  - { name: c, kind: anthropic, upstream: u, match: { path_prefix: /c }, llm: { first_token_timeout: 10s, max_token_gap: 2s } }
"#,
        );
        assert_eq!(
            errs,
            [
                "routes[0].llm: only routes of kind openai or anthropic read LLM traffic",
                "routes[1].llm.max_models: must be at least 1",
                "routes[1].llm.first_token_timeout: must be more than 0 (leave it out to turn it off)",
            ]
        );
    }

    #[test]
    fn lists_every_problem_by_path() {
        let errs = errors(
            r#"
upstreams:
  - name: openai
    endpoints: ["ftp://x"]
    headers: { authorization: "Bearer ${OPENAI_API_KEY}" }
routes:
  - { upstream: openai, match: { path_prefix: /a } }
  - { upstream: openai, name: b, match: { path_prefix: /b } }
  - { upstream: opneai, name: c, match: { path_prefix: nope } }
"#,
        );
        assert!(
            errs.contains(
                &r#"routes[2].upstream: unknown upstream "opneai" (did you mean "openai"?)"#
                    .to_string()
            ),
            "{errs:?}"
        );
        assert!(
            errs.iter()
                .any(|e| e.starts_with("upstreams[0].endpoints[0]: URL \"ftp://x\"")),
            "{errs:?}"
        );
        assert!(errs.iter().any(|e| e.starts_with("upstreams[0].headers.authorization: environment variable OPENAI_API_KEY is not set")), "{errs:?}");
        assert!(
            errs.iter()
                .any(|e| e.starts_with("routes[2].match.path_prefix")),
            "{errs:?}"
        );
        assert_eq!(errs.len(), 4, "{errs:?}");
    }

    #[test]
    fn limits_are_checked_by_path() {
        let errs = errors(
            "limits: { max_in_flight_requests: 0, header_read_timeout: 0s }\nupstreams: [{ name: a, endpoints: [http://a] }]\nroutes: [{ upstream: a }]\n",
        );
        assert_eq!(
            errs,
            [
                "limits.max_in_flight_requests: must be at least 1",
                "limits.header_read_timeout: must be more than 0s"
            ],
        );
    }

    #[test]
    fn type_errors_name_the_field() {
        let errs = errors("upstreams:\n  - name: a\n    endpoints: [http://a]\n    timeouts: { connect: soon }\nroutes: [{ upstream: a }]\n");
        assert_eq!(errs.len(), 1);
        assert!(
            errs[0].starts_with("upstreams[0].timeouts.connect:"),
            "{errs:?}"
        );
        let errs = errors("routes: [{ upstream: a, upstrem: b }]\n");
        assert!(
            errs[0].starts_with("routes[0].upstrem: unknown field `upstrem`, expected one of"),
            "{errs:?}"
        );
    }

    #[test]
    fn defaults_and_env() {
        let config = Config::from_yaml(
            "upstreams:\n  - name: a\n    endpoints: ['${BASE:-http://127.0.0.1:9}']\n    headers: { authorization: 'Bearer ${KEY:-}' }\nroutes: [{ upstream: a }]\n",
            &|_| None,
        )
        .expect("valid");
        assert_eq!(config.routes[0].name, "a");
        assert_eq!(config.upstreams[0].endpoints[0].value, "http://127.0.0.1:9");
        assert_eq!(config.upstreams[0].pool.idle_timeout.as_secs(), 4);
        assert_eq!(config.admin.address.to_string(), "127.0.0.1:9901");
    }

    #[test]
    fn batch_fields_are_checked_by_path() {
        let errs = errors(
            "upstreams: [{ name: a, endpoints: [http://a] }]\nroutes:\n  - { upstream: a, kind: openai, batch: { max_inputs: 0, max_wait: 0s, max_body_bytes: 0 } }\n  - { upstream: a, name: b, match: { path_prefix: /b }, batch: {} }\n",
        );
        assert!(
            errs.contains(&"routes[0].batch.max_inputs: must be at least 1".to_string()),
            "{errs:?}"
        );
        assert!(
            errs.contains(&"routes[0].batch.max_wait: must be greater than 0".to_string()),
            "{errs:?}"
        );
        assert!(
            errs.contains(&"routes[0].batch.max_body_bytes: must be at least 1".to_string()),
            "{errs:?}"
        );
        assert!(
            errs.iter().any(|e| e
                .starts_with("routes[1].batch: embeddings batching needs a route of kind: openai")),
            "{errs:?}"
        );
        assert_eq!(errs.len(), 4, "{errs:?}");
        let config = Config::from_yaml(
            "upstreams: [{ name: a, endpoints: [http://a] }]\nroutes: [{ upstream: a, kind: openai, batch: { on_error: split } }]\n",
            &|_| None,
        )
        .expect("valid");
        let batch = config.routes[0].batch.as_ref().expect("batch");
        assert_eq!(batch.max_inputs, 256);
        assert_eq!(batch.max_wait.as_millis(), 5);
        assert_eq!(batch.on_error, crate::config::BatchOnError::Split);
    }
}
