//! What `/config` may show of values that can hold secrets. When in doubt, a value is redacted:
//! an operator reading `/config` loses a little, a leaked key costs far more.
//!
//! - Header values an upstream adds are shown only for a short list of headers that never carry
//!   a credential (`user-agent`, `anthropic-version`, ...). Any other header is shown only when
//!   it is nothing but `${VAR}` references and an auth scheme word (`Bearer ${KEY}`); literal
//!   text (`x-custom-token: literal-...`) is redacted.
//! - The default of `${VAR:-default}` is redacted wherever it could be a secret (it is written
//!   in the file, so it is a literal secret when it is one).
//! - The password in a URL (`http://user:pw@host`) is redacted, in literals and defaults alike.

use super::EnvString;

pub const REDACTED: &str = "<redacted>";

/// Headers whose values are never credentials: shown in `/config` as written.
const PLAIN_HEADERS: &[&str] = &[
    "accept",
    "accept-encoding",
    "accept-language",
    "anthropic-beta",
    "anthropic-version",
    "cache-control",
    "content-type",
    "openai-beta",
    "user-agent",
    "x-forwarded-proto",
];

/// Words that may precede a credential in a header value (`Bearer ${KEY}`): not secret.
const AUTH_SCHEMES: &[&str] = &["bearer", "basic", "token", "bot", "apikey", "key"];

/// Whether `name`'s value is shown in `/config` as written.
pub fn is_plain_header(name: &str) -> bool {
    PLAIN_HEADERS.iter().any(|h| h.eq_ignore_ascii_case(name))
}

/// The value an upstream header is shown with; `plain` for headers shown as written.
pub fn header_value(value: &EnvString, plain: bool) -> EnvString {
    if plain {
        return value.clone();
    }
    let literal_is_harmless = literal_parts(&value.template).iter().all(|part| {
        part.split_whitespace()
            .all(|word| AUTH_SCHEMES.iter().any(|s| s.eq_ignore_ascii_case(word)))
    });
    if value.uses_env() && literal_is_harmless {
        EnvString::literal(without_defaults(&value.template))
    } else if value.template.is_empty() {
        value.clone()
    } else {
        EnvString::literal(REDACTED)
    }
}

/// A secret (a password, a token): `${VAR}` references are shown, everything else is redacted.
pub fn secret(value: &EnvString) -> EnvString {
    if value.template.is_empty() {
        value.clone()
    } else if value.uses_env() && literal_parts(&value.template).iter().all(|p| p.is_empty()) {
        EnvString::literal(without_defaults(&value.template))
    } else {
        EnvString::literal(REDACTED)
    }
}

/// An endpoint URL: shown as written but for the passwords of URLs in it (literal or default).
pub fn url(value: &EnvString) -> EnvString {
    EnvString::literal(url_password(&value.template))
}

/// Replaces the password of every `scheme://user:password@` in `text`.
pub fn url_password(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(pos) = rest.find("://") {
        let (head, tail) = rest.split_at(pos + 3);
        out.push_str(head);
        // The authority ends at the first of `/`, `?`, `#`, `}` (the end of a `${...}` default)
        // or whitespace.
        let end = tail
            .find(|c: char| matches!(c, '/' | '?' | '#' | '}') || c.is_whitespace())
            .unwrap_or(tail.len());
        let authority = &tail[..end];
        match authority.rsplit_once('@') {
            Some((userinfo, host)) => {
                match userinfo.split_once(':') {
                    Some((user, _)) => {
                        out.push_str(user);
                        out.push(':');
                        out.push_str(REDACTED);
                    }
                    None => out.push_str(userinfo),
                }
                out.push('@');
                out.push_str(host);
            }
            None => out.push_str(authority),
        }
        rest = &tail[end..];
    }
    out.push_str(rest);
    out
}

/// `${NAME:-default}` written as `${NAME:-<redacted>}` (an empty default stays: it only says the
/// variable is optional).
fn without_defaults(template: &str) -> String {
    let mut out = String::with_capacity(template.len());
    let mut rest = template;
    while let Some(pos) = rest.find("${") {
        // `$${` is an escaped literal `${`.
        if pos > 0 && rest.as_bytes()[pos - 1] == b'$' {
            out.push_str(&rest[..pos + 2]);
            rest = &rest[pos + 2..];
            continue;
        }
        out.push_str(&rest[..pos]);
        let tail = &rest[pos..];
        let Some(end) = tail.find('}') else {
            out.push_str(tail);
            return out;
        };
        let expr = &tail[2..end];
        match expr.split_once(":-") {
            Some((name, default)) if !default.is_empty() => {
                out.push_str("${");
                out.push_str(name);
                out.push_str(":-");
                out.push_str(REDACTED);
                out.push('}');
            }
            _ => out.push_str(&tail[..=end]),
        }
        rest = &tail[end + 1..];
    }
    out.push_str(rest);
    out
}

/// The text of a template outside its `${...}` references.
fn literal_parts(template: &str) -> Vec<&str> {
    let mut parts = Vec::new();
    let mut rest = template;
    while let Some(pos) = rest.find("${") {
        if pos > 0 && rest.as_bytes()[pos - 1] == b'$' {
            // An escaped `$${`: literal text; keep scanning after it.
            parts.push(&rest[..pos + 2]);
            rest = &rest[pos + 2..];
            continue;
        }
        parts.push(&rest[..pos]);
        match rest[pos..].find('}') {
            Some(end) => rest = &rest[pos + end + 1..],
            None => return parts,
        }
    }
    parts.push(rest);
    parts
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shown(name: &str, template: &str) -> String {
        header_value(&EnvString::literal(template), is_plain_header(name)).template
    }

    #[test]
    fn header_values() {
        assert_eq!(shown("x-custom-token", "literal-abc"), REDACTED);
        assert_eq!(shown("authorization", "Bearer sk-123"), REDACTED);
        assert_eq!(shown("authorization", "Bearer ${KEY}"), "Bearer ${KEY}");
        assert_eq!(shown("authorization", "Bearer ${KEY:-}"), "Bearer ${KEY:-}");
        assert_eq!(
            shown("x-api-key", "${KEY:-sk-default}"),
            "${KEY:-<redacted>}"
        );
        assert_eq!(shown("x-tenant", "acme-${KEY}"), REDACTED);
        assert_eq!(shown("anthropic-version", "2023-06-01"), "2023-06-01");
        assert_eq!(shown("User-Agent", "${UA:-me}"), "${UA:-me}");
        assert_eq!(shown("x-escaped", "$${KEY}"), REDACTED);
    }

    #[test]
    fn secrets() {
        let s = |t: &str| secret(&EnvString::literal(t)).template;
        assert_eq!(s("hunter2"), REDACTED);
        assert_eq!(s("${PW}"), "${PW}");
        assert_eq!(s("${PW:-hunter2}"), "${PW:-<redacted>}");
        assert_eq!(s("x${PW}"), REDACTED);
        assert_eq!(s(""), "");
    }

    #[test]
    fn url_passwords() {
        assert_eq!(
            url_password("http://user:pw@host:80/base"),
            "http://user:<redacted>@host:80/base"
        );
        assert_eq!(url_password("http://user@host"), "http://user@host");
        assert_eq!(url_password("https://host/a@b"), "https://host/a@b");
        assert_eq!(
            url_password("${BASE:-http://u:p%40ss@h}"),
            "${BASE:-http://u:<redacted>@h}"
        );
        assert_eq!(url_password("${BASE}"), "${BASE}");
    }
}
