//! Human-friendly units used in the YAML file: byte sizes (`10MiB`) and environment-expanded strings.

use serde::{de, Deserialize, Deserializer, Serialize, Serializer};
use std::fmt;

/// A size in bytes, written in YAML as an integer or as `512KiB`, `10MiB`, `1GB`, ...
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct ByteSize(pub u64);

impl ByteSize {
    pub const fn mib(n: u64) -> Self {
        ByteSize(n * 1024 * 1024)
    }

    pub fn parse(text: &str) -> Result<Self, String> {
        let text = text.trim();
        let split = text
            .find(|c: char| !c.is_ascii_digit())
            .unwrap_or(text.len());
        let (digits, unit) = text.split_at(split);
        let n: u64 = digits.parse().map_err(|_| {
            format!("invalid size {text:?}: expected e.g. 1048576, 512KiB or 10MiB")
        })?;
        let multiplier: u64 = match unit.trim().to_ascii_lowercase().as_str() {
            "" | "b" => 1,
            "kb" => 1000,
            "kib" | "k" => 1024,
            "mb" => 1000 * 1000,
            "mib" | "m" => 1024 * 1024,
            "gb" => 1000 * 1000 * 1000,
            "gib" | "g" => 1024 * 1024 * 1024,
            other => {
                return Err(format!(
                    "invalid size unit {other:?} in {text:?}: use B, KB, KiB, MB, MiB, GB or GiB"
                ))
            }
        };
        n.checked_mul(multiplier)
            .map(ByteSize)
            .ok_or_else(|| format!("size {text:?} is too large"))
    }
}

impl<'de> Deserialize<'de> for ByteSize {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Visitor;
        impl de::Visitor<'_> for Visitor {
            type Value = ByteSize;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a size in bytes, e.g. 1048576 or \"10MiB\"")
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<ByteSize, E> {
                Ok(ByteSize(v))
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<ByteSize, E> {
                u64::try_from(v)
                    .map(ByteSize)
                    .map_err(|_| E::custom("size must not be negative"))
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<ByteSize, E> {
                ByteSize::parse(v).map_err(E::custom)
            }
        }
        d.deserialize_any(Visitor)
    }
}

impl Serialize for ByteSize {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_u64(self.0)
    }
}

/// A string that may reference environment variables: `${NAME}` (required) or
/// `${NAME:-default}`. `$${` writes a literal `${`.
///
/// The template is what the file says and what `/config` shows (so secrets that come from the
/// environment are never echoed); the value is filled in by validation.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct EnvString {
    pub template: String,
    pub value: String,
    /// Some referenced variable expanded to the empty string (an optional secret that is absent).
    pub has_empty_var: bool,
}

impl EnvString {
    pub fn literal(s: impl Into<String>) -> Self {
        let s = s.into();
        EnvString {
            template: s.clone(),
            value: s,
            has_empty_var: false,
        }
    }

    /// True when the template takes (part of) its value from the environment.
    pub fn uses_env(&self) -> bool {
        self.template.replace("$${", "").contains("${")
    }

    /// Expands the template with `lookup`; on failure says which variable is missing.
    pub fn expand(&mut self, lookup: &dyn Fn(&str) -> Option<String>) -> Result<(), String> {
        let (value, has_empty_var) = expand(&self.template, lookup)?;
        self.value = value;
        self.has_empty_var = has_empty_var;
        Ok(())
    }
}

fn expand(
    template: &str,
    lookup: &dyn Fn(&str) -> Option<String>,
) -> Result<(String, bool), String> {
    let mut out = String::with_capacity(template.len());
    let mut has_empty_var = false;
    let mut rest = template;
    while let Some(pos) = rest.find('$') {
        out.push_str(&rest[..pos]);
        let after = &rest[pos..];
        if let Some(tail) = after.strip_prefix("$${") {
            out.push_str("${");
            rest = tail;
        } else if let Some(tail) = after.strip_prefix("${") {
            let end = tail
                .find('}')
                .ok_or_else(|| format!("unclosed \"${{\" in {template:?}"))?;
            let expr = &tail[..end];
            let (name, default) = match expr.split_once(":-") {
                Some((n, d)) => (n, Some(d)),
                None => (expr, None),
            };
            if name.is_empty() || !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
                return Err(format!("invalid environment variable name {name:?}"));
            }
            let value = match (lookup(name), default) {
                (Some(v), _) => v,
                (None, Some(d)) => d.to_string(),
                (None, None) => {
                    return Err(format!(
                        "environment variable {name} is not set (set it, or write ${{{name}:-default}})"
                    ))
                }
            };
            has_empty_var |= value.is_empty();
            out.push_str(&value);
            rest = &tail[end + 1..];
        } else {
            out.push('$');
            rest = &after[1..];
        }
    }
    out.push_str(rest);
    Ok((out, has_empty_var))
}

impl<'de> Deserialize<'de> for EnvString {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let template = String::deserialize(d)?;
        Ok(EnvString {
            value: String::new(),
            template,
            has_empty_var: false,
        })
    }
}

impl Serialize for EnvString {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.template)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(name: &str) -> Option<String> {
        match name {
            "KEY" => Some("sk-123".into()),
            "EMPTY" => Some(String::new()),
            _ => None,
        }
    }

    #[test]
    fn sizes() {
        assert_eq!(ByteSize::parse("10MiB"), Ok(ByteSize(10 * 1024 * 1024)));
        assert_eq!(ByteSize::parse("1kb"), Ok(ByteSize(1000)));
        assert_eq!(ByteSize::parse("42"), Ok(ByteSize(42)));
        assert!(ByteSize::parse("10 parsecs").is_err());
        assert!(ByteSize::parse("MiB").is_err());
    }

    #[test]
    fn expansion() {
        assert_eq!(
            expand("Bearer ${KEY}", &env),
            Ok(("Bearer sk-123".into(), false))
        );
        assert_eq!(
            expand("${NOPE:-http://x}", &env),
            Ok(("http://x".into(), false))
        );
        assert_eq!(
            expand("Bearer ${NOPE:-}", &env),
            Ok(("Bearer ".into(), true))
        );
        assert_eq!(expand("${EMPTY:-d}", &env), Ok((String::new(), true)));
        assert_eq!(
            expand("cost $5 $${KEY}", &env),
            Ok(("cost $5 ${KEY}".into(), false))
        );
        let err = expand("Bearer ${MISSING}", &env).unwrap_err();
        assert!(err.contains("MISSING is not set"), "{err}");
        assert!(expand("${KEY", &env).is_err());
        assert!(expand("${BAD-NAME}", &env).is_err());
    }
}
