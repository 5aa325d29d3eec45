//! Which requests are reads that may be cached or coalesced. Writes never are: serving a write
//! from cache, or sending one upstream once for two clients, silently drops a write.
//!
//! A route's rules are the union of its presets and its own rules. A route with neither allows
//! `GET` and `HEAD` only, the HTTP safe methods; the LLM kinds will add their own POST endpoints
//! (chat completions, embeddings, ...) through this same type. Whatever the rules, a path is
//! refused when it has a `.` or `..` segment (also percent-encoded) or an encoded `/` or `\`,
//! since the upstream may normalise it into a different endpoint than the one matched here.
//!
//! Presets:
//! - `clickhouse`: any `GET` (ClickHouse runs GET requests with `readonly`); `POST` and `HEAD`
//!   (which ClickHouse does not make read-only) when the statement is read-only, see
//!   [`sql_is_read_only`]. The statement is the `query` URL parameter, a line break and the body,
//!   as ClickHouse assembles it; `decompress` (a compressed body) is refused.
//! - `elasticsearch`, `opensearch`: `GET`/`POST` of `_search`, `_count`, `_msearch`, `_mget`,
//!   `_search/template` and `_msearch/template`, at the root or under up to two targets
//!   (`/logs-*/_search`, `/idx/type/_count`); `GET`/`HEAD` of `/{index}/_doc/{id}` and
//!   `/{index}/_source/{id}`. Targets must not start with `_` (except `_all`), so the document
//!   write `POST /idx/_doc/_search` is not taken for a search. Never `_bulk`, `_update`,
//!   `_delete_by_query`, `PUT` or `DELETE`, and never a search with `scroll` (it opens a cursor).
//! - `qdrant`: `POST /collections/{name}/points` (retrieve by ids) and
//!   `/collections/{name}/points/` + `search`, `query`, `recommend`, `discover` (each also
//!   `/batch`), `search/groups`, `query/groups`, `recommend/groups`, `scroll`, `count`; `GET
//!   /collections/{name}/points/{id}`. Upserts (`PUT`) and `points/delete`, `points/payload`, ...
//!   are not reads.
//! - `postgrest`: `GET` and `HEAD`, any path.

use crate::config::{CacheRule, PathSegment, Preset};
use http::Method;

/// The compiled presets and rules of one route. The default (no presets, no rules) allows `GET`
/// and `HEAD` only.
#[derive(Debug, Clone, Default)]
pub struct Rules {
    presets: Vec<Preset>,
    rules: Vec<CompiledRule>,
}

#[derive(Debug, Clone)]
struct CompiledRule {
    methods: Vec<Method>,
    glob: Vec<PathSegment>,
}

impl Rules {
    /// Rules were checked when the config was parsed, so building them cannot fail.
    pub fn new(presets: &[Preset], rules: &[CacheRule]) -> Rules {
        Rules {
            presets: presets.to_vec(),
            rules: rules
                .iter()
                .map(|rule| CompiledRule {
                    methods: rule.methods.iter().map(|m| m.0.clone()).collect(),
                    glob: rule.path.segments().to_vec(),
                })
                .collect(),
        }
    }

    /// True if the request is a read that may be cached or shared. `body` is the full request
    /// body (may be empty). A body with a `content-encoding` other than identity would be judged
    /// as if it were plain text: the caller should treat such a request as not cacheable.
    pub fn allows(&self, method: &Method, path: &str, query: Option<&str>, body: &[u8]) -> bool {
        let Some(segments) = plain_segments(path) else {
            return false;
        };
        if self.presets.is_empty() && self.rules.is_empty() {
            return method == Method::GET || method == Method::HEAD;
        }
        self.presets
            .iter()
            .any(|p| preset_allows(*p, method, &segments, query, body))
            || self
                .rules
                .iter()
                .any(|r| r.methods.contains(method) && glob_matches(&r.glob, &segments))
    }
}

/// The path's segments (after the leading `/`, raw), or None when the upstream could read the
/// path as something else: dot segments, encoded slashes, backslashes, bad percent-encoding.
fn plain_segments(path: &str) -> Option<Vec<&str>> {
    let rest = path.strip_prefix('/')?;
    let segments: Vec<&str> = rest.split('/').collect();
    for segment in &segments {
        let decoded = if segment.contains('%') {
            percent_decode(segment, Plus::Literal)?
        } else {
            segment.as_bytes().to_vec()
        };
        if decoded == b"."
            || decoded == b".."
            || decoded.contains(&b'/')
            || decoded.contains(&b'\\')
        {
            return None;
        }
    }
    Some(segments)
}

/// `*` matches one non-empty segment, `**` any number; linear in path length whatever the glob
/// (a set of pattern positions, not backtracking).
fn glob_matches(glob: &[PathSegment], segments: &[&str]) -> bool {
    let mut states = vec![false; glob.len() + 1];
    states[0] = true;
    close_over_any(glob, &mut states);
    for segment in segments {
        let mut next = vec![false; glob.len() + 1];
        for (i, pattern) in glob.iter().enumerate() {
            if !states[i] {
                continue;
            }
            match pattern {
                PathSegment::Any => next[i] = true,
                PathSegment::One if !segment.is_empty() => next[i + 1] = true,
                PathSegment::Literal(l) if l == segment => next[i + 1] = true,
                _ => {}
            }
        }
        close_over_any(glob, &mut next);
        if !next.contains(&true) {
            return false;
        }
        states = next;
    }
    states[glob.len()]
}

/// `**` may match no segment: being before it is also being after it.
fn close_over_any(glob: &[PathSegment], states: &mut [bool]) {
    for (i, pattern) in glob.iter().enumerate() {
        if states[i] && *pattern == PathSegment::Any {
            states[i + 1] = true;
        }
    }
}

fn preset_allows(
    preset: Preset,
    method: &Method,
    segments: &[&str],
    query: Option<&str>,
    body: &[u8],
) -> bool {
    match preset {
        Preset::Clickhouse => clickhouse_allows(method, query, body),
        Preset::Elasticsearch | Preset::Opensearch => search_allows(method, segments, query),
        Preset::Qdrant => qdrant_allows(method, segments),
        Preset::Postgrest => method == Method::GET || method == Method::HEAD,
    }
}

fn clickhouse_allows(method: &Method, query: Option<&str>, body: &[u8]) -> bool {
    if method == Method::GET {
        return true;
    }
    if method != Method::POST && method != Method::HEAD {
        return false;
    }
    clickhouse_statement(query, body).is_some_and(|sql| sql_is_read_only(&sql))
}

/// What ClickHouse executes: the `query` parameter, a line break, then the body (the line break
/// only when the parameter is not empty). None when unsure.
fn clickhouse_statement(query: Option<&str>, body: &[u8]) -> Option<String> {
    let mut param: Option<Vec<u8>> = None;
    for pair in query.unwrap_or("").split('&').filter(|p| !p.is_empty()) {
        let (name, value) = pair.split_once('=').unwrap_or((pair, ""));
        let name = percent_decode(name, Plus::Space)?;
        if name == b"query" {
            // Which one wins is the server's business; do not guess.
            if param.replace(percent_decode(value, Plus::Space)?).is_some() {
                return None;
            }
        } else if name == b"decompress" && value != "0" {
            return None;
        }
    }
    let mut sql = param.unwrap_or_default();
    if !sql.is_empty() {
        sql.push(b'\n');
    }
    sql.extend_from_slice(body);
    String::from_utf8(sql).ok()
}

fn search_allows(method: &Method, segments: &[&str], query: Option<&str>) -> bool {
    if has_param(query, "scroll") {
        return false;
    }
    let target = |s: &&str| !s.is_empty() && (!s.starts_with('_') || *s == "_all");
    if method == Method::GET || method == Method::POST {
        let targets = match segments {
            [targets @ .., "_search" | "_count" | "_msearch" | "_mget"] => Some(targets),
            [targets @ .., "_search" | "_msearch", "template"] => Some(targets),
            _ => None,
        };
        if targets.is_some_and(|t| t.len() <= 2 && t.iter().all(target)) {
            return true;
        }
    }
    if method == Method::GET || method == Method::HEAD {
        if let [index, "_doc" | "_source", id] = segments {
            return target(index) && *index != "_all" && !id.is_empty();
        }
    }
    false
}

fn qdrant_allows(method: &Method, segments: &[&str]) -> bool {
    let ["collections", name, "points", tail @ ..] = segments else {
        return false;
    };
    if name.is_empty() {
        return false;
    }
    if method == Method::POST {
        matches!(
            tail,
            [] | ["search" | "query" | "recommend" | "discover" | "scroll" | "count"]
                | ["search" | "query" | "recommend" | "discover", "batch"]
                | ["search" | "query" | "recommend", "groups"]
        )
    } else if method == Method::GET {
        matches!(tail, [id] if !id.is_empty())
    } else {
        false
    }
}

/// Whether the query string has a parameter called `name` (percent-decoded), with any value.
fn has_param(query: Option<&str>, name: &str) -> bool {
    query.unwrap_or("").split('&').any(|pair| {
        let key = pair.split_once('=').map_or(pair, |(k, _)| k);
        // An undecodable name could be anything: count it as present.
        percent_decode(key, Plus::Space).is_none_or(|k| k == name.as_bytes())
    })
}

/// `%XX` decoding (and `+` as space in query strings); None for a malformed escape.
/// What `+` means where it is decoded: a space in form-encoded query strings, itself in paths.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Plus {
    Space,
    Literal,
}

fn percent_decode(text: &str, plus: Plus) -> Option<Vec<u8>> {
    let mut out = Vec::with_capacity(text.len());
    let mut bytes = text.bytes();
    while let Some(b) = bytes.next() {
        match b {
            b'%' => {
                let hi = hex_digit(bytes.next()?)?;
                let lo = hex_digit(bytes.next()?)?;
                out.push((hi << 4) | lo);
            }
            b'+' if plus == Plus::Space => out.push(b' '),
            b => out.push(b),
        }
    }
    Some(out)
}

fn hex_digit(b: u8) -> Option<u8> {
    char::from(b)
        .to_digit(16)
        .and_then(|d| u8::try_from(d).ok())
}

/// Read-only check for SQL over HTTP: true only for a single statement starting with SELECT,
/// WITH, SHOW, DESCRIBE/DESC or EXPLAIN (case-insensitive, after whitespace, comments and
/// opening parentheses), with nothing but whitespace and comments after a `;`. SELECT, WITH and
/// EXPLAIN statements must not contain INSERT, UPDATE, DELETE, ALTER, CREATE, DROP, TRUNCATE,
/// UPSERT or INTO as a bare word outside strings and comments (`WITH ... INSERT`, Postgres's
/// data-modifying CTEs, `SELECT ... INTO`, `EXPLAIN ANALYZE DELETE`, `FOR UPDATE`); a qualified
/// name such as `t.delete` is not a bare word.
///
/// Conservative where SQL dialects disagree, so that whatever the server's dialect, what is
/// judged read-only is read-only: `\'` inside a quoted string (an escape in ClickHouse and
/// MySQL, the end of the string in standard SQL), `#`, `--` not followed by whitespace, nested
/// or `/*!` comments, a lone `\r` in a line comment, unterminated quotes or comments, and `$`
/// other than `$1`-style parameters and `$tag$...$tag$` strings all make it false. It judges the
/// kind of statement, not the functions it calls.
pub fn sql_is_read_only(sql: &str) -> bool {
    let Some(tokens) = tokenize(sql.as_bytes()) else {
        return false;
    };
    let first = tokens.iter().find(|t| **t != Token::Open);
    let scan = match first {
        Some(Token::Word { text, .. }) if is_one_of(text, &["SELECT", "WITH", "EXPLAIN"]) => true,
        Some(Token::Word { text, .. }) if is_one_of(text, &["SHOW", "DESCRIBE", "DESC"]) => false,
        _ => return false,
    };
    const WRITES: [&str; 9] = [
        "INSERT", "UPDATE", "DELETE", "ALTER", "CREATE", "DROP", "TRUNCATE", "UPSERT", "INTO",
    ];
    let mut ended = false;
    for token in &tokens {
        match token {
            Token::Semicolon => ended = true,
            _ if ended => return false,
            Token::Word {
                text,
                qualified: false,
            } if scan && is_one_of(text, &WRITES) => return false,
            _ => {}
        }
    }
    true
}

fn is_one_of(word: &[u8], keywords: &[&str]) -> bool {
    keywords
        .iter()
        .any(|k| word.eq_ignore_ascii_case(k.as_bytes()))
}

/// What the read-only check needs to see of a statement; strings, quoted names, numbers and
/// operators are all `Other`.
#[derive(Debug, PartialEq, Eq)]
enum Token<'a> {
    Word { text: &'a [u8], qualified: bool },
    Semicolon,
    Open,
    Other,
}

/// None when the text could be read differently by different servers (see [`sql_is_read_only`]).
fn tokenize(s: &[u8]) -> Option<Vec<Token<'_>>> {
    let mut tokens = Vec::new();
    let mut i = 0;
    while let Some(&b) = s.get(i) {
        match b {
            b' ' | b'\t' | b'\n' | b'\r' | 0x0b | 0x0c => i += 1,
            b'-' if s.get(i + 1) == Some(&b'-') => {
                // MySQL needs whitespace after `--`; elsewhere `--x` is a comment too.
                if s.get(i + 2)
                    .is_some_and(|c| !c.is_ascii_whitespace() && *c != 0x0b)
                {
                    return None;
                }
                i = skip_line_comment(s, i + 2)?;
            }
            b'/' if s.get(i + 1) == Some(&b'*') => i = skip_block_comment(s, i + 2)?,
            b'#' => return None,
            b'\'' | b'"' | b'`' => {
                i = skip_quoted(s, i)?;
                tokens.push(Token::Other);
            }
            b'$' => {
                // `abc$` is one identifier in Postgres, not in ClickHouse.
                if i > 0 && is_word_char(s[i - 1]) {
                    return None;
                }
                i = skip_dollar(s, i)?;
                tokens.push(Token::Other);
            }
            b';' => {
                tokens.push(Token::Semicolon);
                i += 1;
            }
            b'(' => {
                tokens.push(Token::Open);
                i += 1;
            }
            b'0'..=b'9' => {
                // Digits only: in `1DELETE` the word is still seen.
                while s.get(i).is_some_and(u8::is_ascii_digit) {
                    i += 1;
                }
                tokens.push(Token::Other);
            }
            b if is_word_char(b) => {
                let start = i;
                while s.get(i).is_some_and(|c| is_word_char(*c)) {
                    i += 1;
                }
                let qualified = (start > 0 && s[start - 1] == b'.') || s.get(i) == Some(&b'.');
                tokens.push(Token::Word {
                    text: &s[start..i],
                    qualified,
                });
            }
            _ => {
                tokens.push(Token::Other);
                i += 1;
            }
        }
    }
    Some(tokens)
}

/// ASCII only: a non-ASCII byte ends a word, so a keyword next to, say, a no-break space (which
/// some servers take for whitespace) is still seen.
fn is_word_char(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b == b'_'
}

/// Returns the index after the comment's line break (or the end).
fn skip_line_comment(s: &[u8], from: usize) -> Option<usize> {
    let mut i = from;
    while let Some(&b) = s.get(i) {
        match b {
            b'\n' => return Some(i + 1),
            // Postgres ends the comment at `\r`, ClickHouse at `\n`.
            b'\r' if s.get(i + 1) != Some(&b'\n') => return None,
            _ => i += 1,
        }
    }
    Some(i)
}

/// `from` is just after `/*`. Nested comments (Postgres) and `/*!` (MySQL runs its content) are
/// read differently by different servers.
fn skip_block_comment(s: &[u8], from: usize) -> Option<usize> {
    if s.get(from) == Some(&b'!') {
        return None;
    }
    let mut i = from;
    loop {
        match (s.get(i)?, s.get(i + 1)) {
            (b'*', Some(b'/')) => return Some(i + 2),
            (b'/', Some(b'*')) => return None,
            _ => i += 1,
        }
    }
}

/// `start` is at the opening quote; returns the index after the closing one. A doubled quote is
/// a quote; `\` escapes the next byte, except before the quote itself, where dialects disagree.
fn skip_quoted(s: &[u8], start: usize) -> Option<usize> {
    let quote = s[start];
    let mut i = start + 1;
    loop {
        match *s.get(i)? {
            b'\\' if *s.get(i + 1)? == quote => return None,
            b'\\' => i += 2,
            b if b == quote && s.get(i + 1) == Some(&quote) => i += 2,
            b if b == quote => return Some(i + 1),
            _ => i += 1,
        }
    }
}

/// `$1`-style parameters, and `$tag$ ... $tag$` strings (Postgres, ClickHouse heredocs).
fn skip_dollar(s: &[u8], start: usize) -> Option<usize> {
    let mut i = start + 1;
    if s.get(i).is_some_and(u8::is_ascii_digit) {
        while s.get(i).is_some_and(u8::is_ascii_digit) {
            i += 1;
        }
        return Some(i);
    }
    while s.get(i).is_some_and(|c| is_word_char(*c)) {
        i += 1;
    }
    if s.get(i) != Some(&b'$') {
        return None;
    }
    let delimiter = &s[start..=i];
    let body = i + 1;
    let end = s
        .get(body..)?
        .windows(delimiter.len())
        .position(|w| w == delimiter)?;
    Some(body + end + delimiter.len())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rules(presets: &[Preset]) -> Rules {
        Rules::new(presets, &[])
    }

    fn rule(methods: &[&str], path: &str) -> CacheRule {
        serde_json::from_value(serde_json::json!({ "methods": methods, "path": path }))
            .expect("valid rule")
    }

    fn allows(r: &Rules, method: &str, target: &str, body: &str) -> bool {
        let method = Method::from_bytes(method.as_bytes()).expect("test method");
        let (path, query) = match target.split_once('?') {
            Some((p, q)) => (p, Some(q)),
            None => (target, None),
        };
        r.allows(&method, path, query, body.as_bytes())
    }

    #[test]
    fn read_only_sql() {
        let yes = [
            "SELECT 1",
            "select 1;",
            "SELECT 1;; -- empty statements are harmless",
            "  \n\tSelect * FROM t WHERE a = 'x' ; -- done\n",
            "select ';' as s",
            "SELECT 'DROP TABLE x; INSERT' AS s",
            "SELECT 'it''s', \"col\"\"x\", `a``b` FROM t",
            "SELECT '\\\\' AS backslash",
            "-- leading comment\nSELECT 1",
            "/* block */ SELECT 1 /* trailing */",
            "SELECT 1 -- trailing\r\n",
            "WITH x AS (SELECT 1) SELECT * FROM x",
            "(SELECT 1) UNION ALL (SELECT 2)",
            "SHOW TABLES",
            "SHOW CREATE TABLE t",
            "DESCRIBE TABLE t",
            "desc t",
            "EXPLAIN SELECT 1",
            "SELECT * FROM system.tables",
            "SELECT t.delete, created_at, updated FROM t",
            "SELECT $1, $$ ; DROP $$, $q$it's$q$",
            "SELECT {id:UInt32} FORMAT JSON",
        ];
        for sql in yes {
            assert!(sql_is_read_only(sql), "should be read-only: {sql}");
        }
        let no = [
            "",
            "  -- only a comment",
            "INSERT INTO t VALUES (1)",
            "insert into t select 1",
            "ALTER TABLE t DELETE WHERE 1",
            "CREATE TABLE t (a Int8) ENGINE = Memory",
            "DROP TABLE t",
            "TRUNCATE TABLE t",
            "OPTIMIZE TABLE t FINAL",
            "SYSTEM DROP DNS CACHE",
            "SET max_threads = 1",
            "KILL QUERY WHERE 1",
            "SELECT 1; DROP TABLE x",
            "SELECT 1; SELECT 2",
            "WITH x AS (SELECT 1) INSERT INTO t SELECT * FROM x",
            "WITH d AS (DELETE FROM t RETURNING *) SELECT * FROM d",
            "SELECT * INTO new_table FROM t",
            "SELECT * FROM t FOR UPDATE",
            "EXPLAIN ANALYZE DELETE FROM t",
            "SELECT 'unterminated",
            "SELECT 1 /* unterminated",
            "SELECT 'a\\'; DROP TABLE x; --'",
            "SELECT 1 # comment",
            "SELECT 1 --x\n",
            "SELECT 1 /* a /* nested */ DROP */",
            "SELECT 1 /*! DROP TABLE x */",
            "SELECT 1 -- x\r; DROP TABLE t",
            "SELECT abc$$ ; DROP TABLE t; $$",
            "SELECT $$ unterminated",
            "(INSERT INTO t VALUES (1))",
            "UPDATE t SET a = 1",
            "DELETE FROM t",
            "GRANT ALL ON t TO u",
        ];
        for sql in no {
            assert!(!sql_is_read_only(sql), "should not be read-only: {sql}");
        }
    }

    #[test]
    fn clickhouse() {
        let r = rules(&[Preset::Clickhouse]);
        assert!(allows(&r, "GET", "/?query=SELECT%201", ""));
        assert!(allows(&r, "GET", "/ping", ""));
        assert!(allows(&r, "POST", "/", "SELECT count() FROM hits"));
        assert!(allows(&r, "POST", "/?query=SELECT+1&database=db", ""));
        // Query parameter and body together: "SELECT * FROM t WHERE a =\n1".
        assert!(allows(
            &r,
            "POST",
            "/?query=SELECT%20*%20FROM%20t%20WHERE%20a%20%3D",
            "1"
        ));
        assert!(allows(&r, "HEAD", "/?query=SELECT%201", ""));

        assert!(!allows(&r, "POST", "/", "INSERT INTO t VALUES (1)"));
        assert!(!allows(
            &r,
            "POST",
            "/?query=INSERT%20INTO%20t%20FORMAT%20CSV",
            "1,2\n"
        ));
        assert!(!allows(&r, "POST", "/?query=SELECT%201", "; DROP TABLE x"));
        assert!(!allows(&r, "POST", "/", "SELECT 1; DROP TABLE x"));
        assert!(!allows(&r, "HEAD", "/?query=DROP%20TABLE%20t", ""));
        assert!(!allows(&r, "POST", "/", ""));
        assert!(!allows(&r, "POST", "/?query=SELECT%201&query=DROP", ""));
        assert!(!allows(&r, "POST", "/?query=SELECT%2", ""));
        assert!(!allows(&r, "POST", "/?decompress=1", "SELECT 1"));
        assert!(!allows(&r, "PUT", "/", "SELECT 1"));
        assert!(!allows(
            &r,
            "POST",
            "/",
            "--boundary\r\nContent-Disposition: form-data"
        ));
        let r = rules(&[Preset::Clickhouse]);
        assert!(!r.allows(&Method::POST, "/", None, b"SELECT '\xff'"));
    }

    #[test]
    fn elasticsearch_and_opensearch() {
        for preset in [Preset::Elasticsearch, Preset::Opensearch] {
            let r = rules(&[preset]);
            for (method, target) in [
                ("POST", "/_search"),
                ("GET", "/logs-*/_search"),
                ("POST", "/a,b/_search?size=0"),
                ("POST", "/_all/_count"),
                ("POST", "/idx/type/_search"),
                ("POST", "/_msearch"),
                ("POST", "/idx/_mget"),
                ("POST", "/idx/_search/template"),
                ("GET", "/_msearch/template"),
                ("GET", "/idx/_doc/1"),
                ("HEAD", "/idx/_doc/1"),
                ("GET", "/idx/_source/1"),
            ] {
                assert!(
                    allows(&r, method, target, "{}"),
                    "{preset:?} {method} {target}"
                );
            }
            for (method, target) in [
                ("POST", "/_bulk"),
                ("POST", "/idx/_bulk"),
                ("POST", "/idx/_update/1"),
                ("POST", "/idx/_update/_search"),
                ("POST", "/idx/_doc/_search"),
                ("POST", "/idx/_delete_by_query"),
                ("POST", "/idx/_doc/1"),
                ("PUT", "/idx/_doc/1"),
                ("DELETE", "/idx/_doc/1"),
                ("PUT", "/idx/_search"),
                ("DELETE", "/idx"),
                ("POST", "/_search/scroll"),
                ("POST", "/idx/_search?scroll=1m"),
                ("POST", "/a/b/c/_search"),
                ("POST", "/idx/_bulk/../_search"),
                ("POST", "/idx/%2e%2e/_search"),
                ("POST", "/idx%2f_bulk/_search"),
                ("GET", "/_cat/indices"),
            ] {
                assert!(
                    !allows(&r, method, target, "{}"),
                    "{preset:?} {method} {target}"
                );
            }
        }
    }

    #[test]
    fn qdrant() {
        let r = rules(&[Preset::Qdrant]);
        for tail in [
            "",
            "/search",
            "/search/batch",
            "/search/groups",
            "/query",
            "/query/batch",
            "/scroll",
            "/count",
            "/recommend",
            "/discover/batch",
        ] {
            let target = format!("/collections/docs/points{tail}");
            assert!(allows(&r, "POST", &target, "{}"), "{target}");
        }
        assert!(allows(&r, "GET", "/collections/docs/points/42", ""));
        for (method, target) in [
            ("PUT", "/collections/docs/points"),
            ("POST", "/collections/docs/points/delete"),
            ("POST", "/collections/docs/points/payload"),
            ("PUT", "/collections/docs/points/payload"),
            ("PUT", "/collections/docs/points/vectors"),
            ("POST", "/collections/docs/points/search/extra"),
            ("DELETE", "/collections/docs"),
            ("GET", "/collections"),
            ("POST", "/collections//points/search"),
        ] {
            assert!(!allows(&r, method, target, "{}"), "{method} {target}");
        }
    }

    #[test]
    fn postgrest_and_default() {
        for r in [rules(&[Preset::Postgrest]), Rules::default()] {
            assert!(allows(&r, "GET", "/films?select=title", ""));
            assert!(allows(&r, "HEAD", "/films", ""));
            assert!(!allows(&r, "POST", "/rpc/add", "{}"));
            assert!(!allows(&r, "PATCH", "/films?id=eq.1", "{}"));
            assert!(!allows(&r, "GET", "/films/../admin", ""));
        }
        assert!(!allows(
            &Rules::default(),
            "POST",
            "/v1/chat/completions",
            "{}"
        ));
    }

    #[test]
    fn user_rules_and_globs() {
        let user = [
            rule(&["post"], "/collections/*/points/search"),
            rule(&["POST", "QUERY"], "/v1/**/embeddings"),
        ];
        let r = Rules::new(&[], &user);
        assert!(allows(&r, "POST", "/collections/a/points/search", ""));
        assert!(!allows(&r, "POST", "/collections//points/search", ""));
        assert!(!allows(&r, "POST", "/collections/a/b/points/search", ""));
        assert!(!allows(&r, "GET", "/collections/a/points/search", ""));
        assert!(allows(&r, "POST", "/v1/embeddings", ""));
        assert!(allows(&r, "QUERY", "/v1/a/b/c/embeddings", ""));
        assert!(!allows(&r, "POST", "/v1/a/embeddings/x", ""));
        // Rules replace the GET/HEAD default.
        assert!(!allows(&r, "GET", "/anything", ""));

        let any = |glob: &str, path: &str| {
            allows(&Rules::new(&[], &[rule(&["GET"], glob)]), "GET", path, "")
        };
        assert!(any("/**", "/"));
        assert!(any("/**", "/a/b/c"));
        assert!(any("/a/**", "/a"));
        assert!(any("/**/x/**/y", "/x/y"));
        assert!(any("/**/x/**/y", "/q/x/r/s/y"));
        assert!(!any("/**/x/**/y", "/q/x/r/s/y/z"));
        assert!(any("/*/*", "/a/b"));
        assert!(!any("/*/*", "/a"));
        assert!(!any("/a", "/A"));
        let long = format!("/{}", vec!["x"; 5000].join("/"));
        assert!(!any("/**/x/**/x/**/x/**/y", &long));

        // Presets and rules add up.
        let both = Rules::new(&[Preset::Postgrest], &user);
        assert!(allows(&both, "GET", "/films", ""));
        assert!(allows(&both, "POST", "/v1/embeddings", ""));
    }

    #[test]
    fn config_spelling() {
        let presets: Vec<Preset> = serde_json::from_str(
            r#"["clickhouse","elasticsearch","opensearch","qdrant","postgrest"]"#,
        )
        .expect("preset names");
        assert_eq!(presets.len(), 5);
        assert!(serde_json::from_str::<Preset>(r#""ClickHouse""#).is_err());
        let rule: Result<CacheRule, _> =
            serde_json::from_str(r#"{"methods":["GET"],"path":"/x","extra":1}"#);
        assert!(rule.is_err());
    }
}
