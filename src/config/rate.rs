//! Rate-limit values as they are written in `routes[].rate_limits[]`, parsed once at load.

use http::HeaderName;
use serde::{Deserialize, Serialize};
use std::fmt;
use std::num::NonZeroU32;
use std::time::Duration;

/// `100/s`, `600/min`, `5000/h`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(try_from = "String", into = "String")]
pub struct Rate {
    pub count: NonZeroU32,
    pub per: RatePeriod,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RatePeriod {
    Second,
    Minute,
    Hour,
}

impl RatePeriod {
    pub fn duration(self) -> Duration {
        match self {
            RatePeriod::Second => Duration::from_secs(1),
            RatePeriod::Minute => Duration::from_secs(60),
            RatePeriod::Hour => Duration::from_secs(3600),
        }
    }

    fn suffix(self) -> &'static str {
        match self {
            RatePeriod::Second => "s",
            RatePeriod::Minute => "min",
            RatePeriod::Hour => "h",
        }
    }
}

impl Rate {
    pub fn parse(text: &str) -> Result<Rate, String> {
        let bad = || format!("invalid rate {text:?}: expected e.g. 100/s, 600/min or 5000/h");
        let (count, unit) = text.trim().split_once('/').ok_or_else(bad)?;
        let count: u32 = count.trim().parse().map_err(|_| bad())?;
        let count = NonZeroU32::new(count)
            .ok_or_else(|| format!("invalid rate {text:?}: the count must be at least 1"))?;
        let per = match unit.trim() {
            "s" | "sec" | "second" => RatePeriod::Second,
            "m" | "min" | "minute" => RatePeriod::Minute,
            "h" | "hour" => RatePeriod::Hour,
            _ => return Err(bad()),
        };
        Ok(Rate { count, per })
    }

    pub fn period(&self) -> Duration {
        self.per.duration()
    }
}

impl fmt::Display for Rate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.count, self.per.suffix())
    }
}

impl TryFrom<String> for Rate {
    type Error = String;
    fn try_from(text: String) -> Result<Self, String> {
        Rate::parse(&text)
    }
}

impl From<Rate> for String {
    fn from(rate: Rate) -> String {
        rate.to_string()
    }
}

/// What a rate limit counts by: `route` (one bucket), `credential`, `client_ip`, or
/// `header:<name>`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(try_from = "String", into = "String")]
pub enum RateLimitKey {
    Route,
    /// A hash of `authorization` / `x-api-key` (never the credential itself).
    Credential,
    ClientIp,
    Header(HeaderName),
}

impl RateLimitKey {
    pub fn parse(text: &str) -> Result<RateLimitKey, String> {
        match text {
            "route" => Ok(RateLimitKey::Route),
            "credential" => Ok(RateLimitKey::Credential),
            "client_ip" => Ok(RateLimitKey::ClientIp),
            other => match other.strip_prefix("header:") {
                Some(name) => HeaderName::from_bytes(name.trim().as_bytes())
                    .map(RateLimitKey::Header)
                    .map_err(|_| format!("invalid header name {name:?}")),
                None => Err(format!(
                    "unknown key {other:?}: use route, credential, client_ip or header:<name>"
                )),
            },
        }
    }
}

impl fmt::Display for RateLimitKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RateLimitKey::Route => f.write_str("route"),
            RateLimitKey::Credential => f.write_str("credential"),
            RateLimitKey::ClientIp => f.write_str("client_ip"),
            RateLimitKey::Header(name) => write!(f, "header:{name}"),
        }
    }
}

impl TryFrom<String> for RateLimitKey {
    type Error = String;
    fn try_from(text: String) -> Result<Self, String> {
        RateLimitKey::parse(&text)
    }
}

impl From<RateLimitKey> for String {
    fn from(key: RateLimitKey) -> String {
        key.to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rates_parse_and_print_back() {
        let rate = Rate::parse("100/s").unwrap();
        assert_eq!(rate.count.get(), 100);
        assert_eq!(rate.period(), Duration::from_secs(1));
        assert_eq!(
            Rate::parse("600/min").map(|r| r.period()),
            Ok(Duration::from_secs(60))
        );
        assert_eq!(Rate::parse("5000/hour").unwrap().to_string(), "5000/h");
        assert!(Rate::parse("0/s").is_err());
        assert!(Rate::parse("ten/s").is_err());
        assert!(Rate::parse("10/fortnight").is_err());
    }

    #[test]
    fn keys_parse_and_print_back() {
        for text in ["route", "credential", "client_ip", "header:x-tenant"] {
            assert_eq!(RateLimitKey::parse(text).unwrap().to_string(), text);
        }
        assert!(RateLimitKey::parse("header:bad name").is_err());
        assert!(RateLimitKey::parse("ip").is_err());
    }
}
