//! Status matchers as written in `upstreams[].health_check.expected_statuses`.

use http::StatusCode;
use serde::{Deserialize, Serialize};
use std::fmt;

/// One entry of `expected_statuses`: an exact code (`200`) or a class (`2xx`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize, Serialize)]
#[serde(try_from = "StatusText", into = "String")]
pub enum StatusMatch {
    Code(u16),
    Class(u16),
}

/// YAML may write a code as a number (`200`) or a string (`"2xx"`).
#[derive(Deserialize)]
#[serde(untagged)]
enum StatusText {
    Number(u64),
    Text(String),
}

impl StatusMatch {
    pub fn parse(text: &str) -> Result<StatusMatch, String> {
        let t = text.trim().to_ascii_lowercase();
        let bad = || format!("expected a status code (200) or class (2xx), got {text:?}");
        if let Some(class) = t.strip_suffix("xx") {
            let c: u16 = class.parse().map_err(|_| bad())?;
            return if (1..=5).contains(&c) {
                Ok(StatusMatch::Class(c))
            } else {
                Err(bad())
            };
        }
        let code: u16 = t.parse().map_err(|_| bad())?;
        if (100..=599).contains(&code) {
            Ok(StatusMatch::Code(code))
        } else {
            Err(bad())
        }
    }

    pub fn matches(self, status: StatusCode) -> bool {
        match self {
            StatusMatch::Code(c) => status.as_u16() == c,
            StatusMatch::Class(c) => status.as_u16() / 100 == c,
        }
    }
}

impl fmt::Display for StatusMatch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            StatusMatch::Code(c) => write!(f, "{c}"),
            StatusMatch::Class(c) => write!(f, "{c}xx"),
        }
    }
}

impl TryFrom<StatusText> for StatusMatch {
    type Error = String;
    fn try_from(text: StatusText) -> Result<Self, String> {
        match text {
            StatusText::Number(n) => StatusMatch::parse(&n.to_string()),
            StatusText::Text(t) => StatusMatch::parse(&t),
        }
    }
}

impl From<StatusMatch> for String {
    fn from(status: StatusMatch) -> String {
        status.to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_and_classes() {
        assert_eq!(StatusMatch::parse("200"), Ok(StatusMatch::Code(200)));
        assert_eq!(StatusMatch::parse("2XX"), Ok(StatusMatch::Class(2)));
        assert!(StatusMatch::parse("6xx").is_err());
        assert!(StatusMatch::parse("99").is_err());
        assert!(StatusMatch::Class(4).matches(StatusCode::NOT_FOUND));
        assert!(!StatusMatch::Class(2).matches(StatusCode::UNAUTHORIZED));
        assert!(StatusMatch::parse("abc").is_err() && StatusMatch::parse("700").is_err());
        assert_eq!(StatusMatch::Class(2).to_string(), "2xx");
    }
}
