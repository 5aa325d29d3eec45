//! What a route's cache may store beyond `GET`/`HEAD`: built-in presets for HTTP databases and
//! user rules (methods + path glob), parsed and checked once at load.

use super::method::ReadMethod;
use serde::{Deserialize, Serialize};
use std::fmt;

/// Built-in read-only request rules (see `cache::rules` for what each allows).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Preset {
    Clickhouse,
    Elasticsearch,
    Opensearch,
    Qdrant,
    Postgrest,
}

/// A user rule: method(s) + path glob (`*` = one path segment, `**` = any number of segments,
/// including none, e.g. `/collections/*/points/search`). Methods are case-insensitive; PUT,
/// PATCH, DELETE and CONNECT are refused. The query string is not matched.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct CacheRule {
    pub methods: Vec<ReadMethod>,
    pub path: PathGlob,
}

/// A path glob, split into segments after the leading `/`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(try_from = "String", into = "String")]
pub struct PathGlob {
    text: String,
    segments: Vec<PathSegment>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PathSegment {
    Literal(String),
    /// `*`: one non-empty segment.
    One,
    /// `**`: any number of segments, including none.
    Any,
}

impl PathGlob {
    pub fn segments(&self) -> &[PathSegment] {
        &self.segments
    }
}

impl TryFrom<String> for PathGlob {
    type Error = String;
    fn try_from(glob: String) -> Result<Self, String> {
        let Some(rest) = glob.strip_prefix('/') else {
            return Err(format!("{glob:?} must start with '/'"));
        };
        if glob.contains(['?', '#']) {
            return Err(format!(
                "{glob:?}: the query string is not matched, leave it out of the path"
            ));
        }
        let segments = rest
            .split('/')
            .map(|segment| match segment {
                "*" => Ok(PathSegment::One),
                "**" => Ok(PathSegment::Any),
                "." | ".." => Err(format!(
                    "{glob:?}: paths with '.' or '..' segments are never cached"
                )),
                s if s.contains('*') => Err(format!(
                    "{glob:?}: '*' and '**' must be whole path segments, not part of {s:?}"
                )),
                s => Ok(PathSegment::Literal(s.to_string())),
            })
            .collect::<Result<_, _>>()?;
        Ok(PathGlob {
            text: glob,
            segments,
        })
    }
}

impl From<PathGlob> for String {
    fn from(glob: PathGlob) -> String {
        glob.text
    }
}

impl fmt::Display for PathGlob {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bad(methods: &[&str], path: &str) -> String {
        let rule = serde_json::json!({ "methods": methods, "path": path });
        serde_json::from_value::<CacheRule>(rule)
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default()
    }

    #[test]
    fn invalid_rules() {
        assert!(bad(&["PUT"], "/x").starts_with("PUT changes state"));
        assert!(bad(&["GET", "delete"], "/x").starts_with("DELETE changes state"));
        assert!(bad(&["GE T"], "/x").contains("not an HTTP method"));
        assert!(bad(&[""], "/x").contains("not an HTTP method"));
        assert!(bad(&["GET"], "x/y").contains("must start with '/'"));
        assert!(bad(&["GET"], "").contains("must start with '/'"));
        assert!(bad(&["GET"], "/a*b").contains("whole path segments"));
        assert!(bad(&["GET"], "/a/***").contains("whole path segments"));
        assert!(bad(&["GET"], "/a?b=c").contains("query string"));
        assert!(bad(&["GET"], "/a/../b").contains("'..'"));
        assert!(bad(&["GET"], "/a/*/b").is_empty());
    }
}
