//! Startup parameters that follow a client across server connections. PostgreSQL applies a
//! client's startup parameters (`application_name`, `TimeZone`, ...) to its session; in a
//! pool, server connections are shared, so, like PgBouncer, sidelight tracks a bounded list of
//! them per client and per server connection and, when a client gets a server connection
//! whose values differ, runs one `set_config`/`RESET` query ahead of the client's first
//! message, its answer swallowed. Values the server reports with ParameterStatus (including
//! after a client's own `SET`) update both sides, so they are tracked as the server spells
//! them. Other startup parameters (`options`, custom GUCs) are not applied.

use super::messages;
use bytes::BytesMut;

/// sidelight's parameter query is answered with a few small messages.
const MAX_ANSWER: usize = 8 * 1024;

/// Canonical names, case-insensitive on input as in PostgreSQL.
pub const TRACKED: [&str; 7] = [
    "application_name",
    "client_encoding",
    "DateStyle",
    "IntervalStyle",
    "TimeZone",
    "search_path",
    "extra_float_digits",
];
/// The first `REPORTED` of `TRACKED` are GUC_REPORT: the server announces their changes.
const REPORTED: usize = 5;

/// One value per tracked parameter; None: the server's default (never SET by anyone).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Values([Option<String>; TRACKED.len()]);

pub fn index(name: &str) -> Option<usize> {
    TRACKED.iter().position(|t| t.eq_ignore_ascii_case(name))
}

impl Values {
    /// A server connection's values from its own startup ParameterStatus messages.
    pub fn from_server(reported: &[(String, String)]) -> Values {
        let mut v = Values::default();
        for (k, val) in reported {
            if let Some(i) = index(k).filter(|i| *i < REPORTED) {
                v.0[i] = Some(val.clone());
            }
        }
        v
    }

    /// What a client wants: its startup parameters over the server's defaults.
    pub fn for_client(startup: &[(String, String)], defaults: &[(String, String)]) -> Values {
        let mut v = Values::from_server(defaults);
        for (k, val) in startup {
            if let Some(i) = index(k) {
                v.0[i] = Some(normalize(i, val));
            }
        }
        v
    }

    /// A ParameterStatus from the server; true if the parameter is tracked.
    pub fn note(&mut self, name: &str, value: &str) -> bool {
        match index(name).filter(|i| *i < REPORTED) {
            Some(i) => {
                if self.0[i].as_deref() != Some(value) {
                    self.0[i] = Some(value.to_string());
                }
                true
            }
            None => false,
        }
    }

    /// The statements that make a server connection with `have` match `self`, if any.
    pub fn sync_sql(&self, have: &Values) -> Option<String> {
        let mut resets = String::new();
        let mut sets = String::new();
        for (i, (want, got)) in self.0.iter().zip(have.0.iter()).enumerate() {
            if want == got {
                continue;
            }
            match want {
                Some(v) => {
                    sets.push_str(if sets.is_empty() { "SELECT " } else { ", " });
                    sets.push_str("pg_catalog.set_config('");
                    sets.push_str(TRACKED[i]);
                    sets.push_str("', E'");
                    for c in v.chars() {
                        match c {
                            '\'' => sets.push_str("''"),
                            '\\' => sets.push_str("\\\\"),
                            c => sets.push(c),
                        }
                    }
                    sets.push_str("', false)");
                }
                None => {
                    resets.push_str("RESET ");
                    resets.push_str(TRACKED[i]);
                    resets.push_str("; ");
                }
            }
        }
        if resets.is_empty() && sets.is_empty() {
            return None;
        }
        resets.push_str(&sets);
        Some(resets)
    }

    /// The ParameterStatus values a client is greeted with: the server's, with its own.
    pub fn startup_status(&self, server: &[(String, String)]) -> Vec<(String, String)> {
        let mut out: Vec<(String, String)> = server.to_vec();
        for (i, v) in self.0.iter().enumerate().take(REPORTED) {
            let Some(v) = v else { continue };
            match out
                .iter_mut()
                .find(|(k, _)| k.eq_ignore_ascii_case(TRACKED[i]))
            {
                Some(slot) => slot.1 = v.clone(),
                None => out.push((TRACKED[i].to_string(), v.clone())),
            }
        }
        out
    }
}

/// One client's side: the values it wants, and the answer to sidelight's query being
/// swallowed.
pub struct ParamSync {
    want: Values,
    /// ReadyForQuerys of sidelight's own queries still to come.
    swallow: u32,
    error: Option<String>,
}

impl ParamSync {
    pub fn new(want: Values) -> ParamSync {
        ParamSync {
            want,
            swallow: 0,
            error: None,
        }
    }

    pub fn swallowing(&self) -> bool {
        self.swallow > 0
    }

    /// The server refused a value: the client is ended with this.
    pub fn take_error(&mut self) -> Option<String> {
        self.error.take()
    }

    /// The Query that makes a server connection with `have` match, if they differ; its
    /// answer is then swallowed.
    pub fn query_for(&mut self, have: &Values) -> Option<BytesMut> {
        let sql = self.want.sync_sql(have)?;
        let mut q = BytesMut::with_capacity(sql.len() + 6);
        messages::query(&mut q, &sql);
        self.swallow += 1;
        Some(q)
    }

    /// Takes one whole message of the answer out of `buf` at `at`, noting reported values on
    /// both sides. False when more bytes are needed, or when the query failed (the client
    /// gets its FATAL, not what follows).
    pub fn swallow(&mut self, buf: &mut BytesMut, at: usize, tracked: Option<&mut Values>) -> bool {
        let avail = buf.len() - at;
        if avail < 5 {
            return false;
        }
        let len = match messages::body_len(&buf[at..at + 5]) {
            Ok(len) if len <= MAX_ANSWER => len,
            _ => {
                self.error = Some("unexpected answer".into());
                self.swallow = 0;
                return false;
            }
        };
        if avail < 5 + len {
            return false;
        }
        let body = &buf[at + 5..at + 5 + len];
        match buf[at] {
            b'S' => self.note_status(body, tracked),
            b'E' => self.error = Some(messages::error_message(body)),
            b'Z' => {
                self.swallow -= 1;
                if let (None, Some(t)) = (&self.error, tracked) {
                    *t = self.want.clone();
                }
            }
            _ => {}
        }
        let tail = buf.split_off(at + 5 + len);
        buf.truncate(at);
        buf.extend_from_slice(&tail);
        self.swallow > 0 || self.error.is_none()
    }

    /// A ParameterStatus body from the server (after the client's own SET, say): both sides
    /// track the value.
    pub fn note_status(&mut self, body: &[u8], tracked: Option<&mut Values>) {
        let Ok((k, rest)) = messages::cstr(body) else {
            return;
        };
        let Ok((v, _)) = messages::cstr(rest) else {
            return;
        };
        if self.want.note(k, v) {
            if let Some(t) = tracked {
                t.note(k, v);
            }
        }
    }
}

/// As the server would report it, where that is simple: `utf-8` and `utf8` are `UTF8`.
fn normalize(i: usize, value: &str) -> String {
    if TRACKED[i] == "client_encoding" {
        let v: String = value
            .chars()
            .filter(|c| *c != '-' && *c != '_')
            .collect::<String>()
            .to_ascii_uppercase();
        if v == "UTF8" || v == "UNICODE" {
            return "UTF8".into();
        }
    }
    value.to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn kv(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn differences_become_one_query() {
        let server = kv(&[("TimeZone", "UTC"), ("application_name", "")]);
        let conn = Values::from_server(&server);
        let same = Values::for_client(&kv(&[("user", "a"), ("timezone", "UTC")]), &server);
        assert_eq!(same.sync_sql(&conn), None);
        let other = Values::for_client(
            &kv(&[("application_name", "it's"), ("search_path", "a, b")]),
            &server,
        );
        assert_eq!(
            other.sync_sql(&conn).as_deref(),
            Some("SELECT pg_catalog.set_config('application_name', E'it''s', false), pg_catalog.set_config('search_path', E'a, b', false)")
        );
        assert_eq!(
            conn.sync_sql(&other).as_deref(),
            Some("RESET search_path; SELECT pg_catalog.set_config('application_name', E'', false)")
        );
        let status = other.startup_status(&server);
        assert!(status.contains(&("application_name".into(), "it's".into())));
        assert!(!status.iter().any(|(k, _)| k == "search_path"));
        let enc = Values::for_client(&kv(&[("client_encoding", "utf-8")]), &server);
        assert!(enc
            .startup_status(&server)
            .contains(&("client_encoding".into(), "UTF8".into())));
    }
}
