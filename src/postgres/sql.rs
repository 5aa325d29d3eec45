//! The little SQL the pooler reads: a statement's first keyword, past whitespace and comments
//! (PostgreSQL's: `--` to the end of the line, `/* */` nested). The cache presets' tokenizer
//! (`cache::rules`) is built for several dialects and whole statements and gives up on nested
//! comments, which PostgreSQL allows; this one only needs a prefix of the text.

/// The first word (ASCII letters, digits, `_`) of `sql`, or None when the text starts with
/// something else or `sql` ends inside the leading comments.
pub fn first_word(sql: &[u8]) -> Option<&[u8]> {
    let mut i = 0;
    loop {
        match sql.get(i)? {
            b' ' | b'\t' | b'\n' | b'\r' | 0x0b | 0x0c => i += 1,
            b'-' if sql.get(i + 1) == Some(&b'-') => {
                i = i + 2 + memchr::memchr(b'\n', sql.get(i + 2..)?)? + 1;
            }
            b'/' if sql.get(i + 1) == Some(&b'*') => {
                let mut depth = 1usize;
                i += 2;
                while depth > 0 {
                    match (sql.get(i)?, sql.get(i + 1)) {
                        (b'*', Some(b'/')) => {
                            depth -= 1;
                            i += 2;
                        }
                        (b'/', Some(b'*')) => {
                            depth += 1;
                            i += 2;
                        }
                        _ => i += 1,
                    }
                }
            }
            _ => break,
        }
    }
    let start = i;
    while sql
        .get(i)
        .is_some_and(|b| b.is_ascii_alphanumeric() || *b == b'_')
    {
        i += 1;
    }
    (i > start).then(|| &sql[start..i])
}

#[cfg(test)]
mod tests {
    use super::first_word;

    #[test]
    fn skips_whitespace_and_comments() {
        assert_eq!(first_word(b"  listen x"), Some(&b"listen"[..]));
        assert_eq!(
            first_word(b"-- hi\n/* a /* nested */ b */\tLISTEN x"),
            Some(&b"LISTEN"[..])
        );
        assert_eq!(first_word(b"select 1"), Some(&b"select"[..]));
        assert_eq!(first_word(b"(select 1)"), None);
        assert_eq!(first_word(b"/* unterminated"), None);
        assert_eq!(first_word(b"-- only a comment"), None);
        assert_eq!(first_word(b""), None);
    }
}
