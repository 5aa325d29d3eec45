//! The one way integration tests write a sidelight config: a typed builder over
//! `serde_json::Value` sections, rendered to YAML with `serde_yaml`.
//!
//! ```ignore
//! Config::one(&up.url())                              // upstream `up` -> route `r`, the common case
//! Config::one(&up.url()).route_set("dedup", json!(true))   // a field on the last route/upstream
//! Config::new()
//!     .upstream(Upstream::new("llm", &[&up.url()]).set("timeouts", json!({ "first_byte": "2s" })))
//!     .route(Route::new("llm", "llm").path_prefix("/v1").set("cache", json!({ "ttl": "10m" })))
//!     .set("limits", json!({ "max_in_flight_requests": 1 }))   // any top-level section
//! ```
//!
//! `with(json!({ .. }))` on `Config`, `Upstream` and `Route` sets several fields at once. Values
//! are plain JSON (`"10m"`, `5`, `true`), each of the type YAML would give the same scalar.
//! Listeners, admin and runtime default as in [`super::proxy::start`] (which takes a `&Config`
//! directly) unless set.

use serde_json::{json, Map, Value};

/// A whole config: top-level sections plus the `upstreams` and `routes` lists.
#[derive(Clone, Debug, Default)]
pub struct Config {
    sections: Map<String, Value>,
    upstreams: Vec<Upstream>,
    routes: Vec<Route>,
}

impl Config {
    pub fn new() -> Self {
        Self::default()
    }

    /// The common case: upstream `up` with one endpoint and route `r` (matching everything) to it.
    pub fn one(endpoint: &str) -> Self {
        Self::new()
            .upstream(Upstream::new("up", &[endpoint]))
            .route(Route::new("r", "up"))
    }

    pub fn upstream(mut self, upstream: Upstream) -> Self {
        self.upstreams.push(upstream);
        self
    }

    pub fn route(mut self, route: Route) -> Self {
        self.routes.push(route);
        self
    }

    /// Sets a field on the upstream added last (`Config::one(url).upstream_set("health_check", ..)`).
    pub fn upstream_set(mut self, key: &str, value: Value) -> Self {
        let last = self.upstreams.pop().expect("no upstream to set a field on");
        self.upstreams.push(last.set(key, value));
        self
    }

    /// Sets a field on the route added last (`Config::one(url).route_set("cache", ..)`).
    pub fn route_set(mut self, key: &str, value: Value) -> Self {
        let last = self.routes.pop().expect("no route to set a field on");
        self.routes.push(last.set(key, value));
        self
    }

    /// Sets any top-level section (`limits`, `llm`, `listeners`, `admin`, `runtime`, ...).
    pub fn set(mut self, key: &str, value: Value) -> Self {
        self.sections.insert(key.to_string(), value);
        self
    }

    /// Every field of the JSON object `sections` as a top-level section, as if `set` one by one.
    pub fn with(mut self, sections: Value) -> Self {
        let Value::Object(sections) = sections else {
            panic!("with() takes a JSON object, not {sections}")
        };
        self.sections.extend(sections);
        self
    }

    pub fn value(&self) -> Value {
        let mut doc = self.sections.clone();
        if !self.upstreams.is_empty() {
            let list = self.upstreams.iter().map(|u| Value::Object(u.0.clone()));
            doc.insert("upstreams".into(), Value::Array(list.collect()));
        }
        if !self.routes.is_empty() {
            let list = self.routes.iter().map(|r| Value::Object(r.0.clone()));
            doc.insert("routes".into(), Value::Array(list.collect()));
        }
        Value::Object(doc)
    }

    pub fn yaml(&self) -> String {
        serde_yaml::to_string(&self.value()).expect("a JSON value always renders as YAML")
    }
}

/// One entry of `upstreams`.
#[derive(Clone, Debug)]
pub struct Upstream(Map<String, Value>);

impl Upstream {
    pub fn new(name: &str, endpoints: &[&str]) -> Self {
        let mut map = Map::new();
        map.insert("name".into(), json!(name));
        map.insert("endpoints".into(), json!(endpoints));
        Self(map)
    }

    /// Every field of the JSON object `fields` (`json!({ "a": 1, "b": 2 })`), as if `set` one by one.
    pub fn with(mut self, fields: Value) -> Self {
        let Value::Object(fields) = fields else {
            panic!("with() takes a JSON object, not {fields}")
        };
        self.0.extend(fields);
        self
    }

    /// Any other field: `headers`, `health_check`, `concurrency`, `timeouts`, `retry`, ...
    pub fn set(mut self, key: &str, value: Value) -> Self {
        self.0.insert(key.to_string(), value);
        self
    }
}

/// One entry of `routes`.
#[derive(Clone, Debug)]
pub struct Route(Map<String, Value>);

impl Route {
    pub fn new(name: &str, upstream: &str) -> Self {
        let mut map = Map::new();
        map.insert("name".into(), json!(name));
        map.insert("upstream".into(), json!(upstream));
        Self(map)
    }

    /// A route without a `name` (sidelight names it after its position).
    pub fn unnamed(upstream: &str) -> Self {
        let mut map = Map::new();
        map.insert("upstream".into(), json!(upstream));
        Self(map)
    }

    /// `match: { path_prefix: prefix }`.
    pub fn path_prefix(self, prefix: &str) -> Self {
        self.set("match", json!({ "path_prefix": prefix }))
    }

    /// `strip_prefix: true`.
    pub fn strip_prefix(self) -> Self {
        self.set("strip_prefix", json!(true))
    }

    /// Every field of the JSON object `fields` (`json!({ "a": 1, "b": 2 })`), as if `set` one by one.
    pub fn with(mut self, fields: Value) -> Self {
        let Value::Object(fields) = fields else {
            panic!("with() takes a JSON object, not {fields}")
        };
        self.0.extend(fields);
        self
    }

    /// Any other field: `kind`, `cache`, `batch`, `rate_limits`, `llm`, `timeouts`, ...
    pub fn set(mut self, key: &str, value: Value) -> Self {
        self.0.insert(key.to_string(), value);
        self
    }
}

impl std::fmt::Display for Config {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.yaml())
    }
}

/// What [`super::proxy::start`] takes: a [`Config`], or YAML text where the text is the point.
pub trait ConfigText {
    fn config_text(&self) -> String;
}

impl ConfigText for Config {
    fn config_text(&self) -> String {
        self.yaml()
    }
}

impl ConfigText for str {
    fn config_text(&self) -> String {
        self.to_string()
    }
}

impl ConfigText for String {
    fn config_text(&self) -> String {
        self.clone()
    }
}
