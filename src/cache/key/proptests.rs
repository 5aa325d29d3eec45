//! Property tests of the canonical JSON in cache keys: the same value written with any key
//! order, whitespace and string escapes gets the same canonical form, which parses back to the
//! value and is its own canonical form; arbitrary bytes are an error or a form, never a panic.

use super::*;
use proptest::prelude::*;

/// Any JSON value serde_json can hold: integers of both signs, finite floats, any strings.
fn json_value() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(Value::from),
        any::<u64>().prop_map(Value::from),
        any::<f64>()
            .prop_filter("finite", |f| f.is_finite())
            .prop_map(Value::from),
        (-1000i32..1000, -5i32..5).prop_map(|(m, e)| Value::from(f64::from(m) * 10f64.powi(e))),
        any::<String>().prop_map(Value::String),
    ];
    leaf.prop_recursive(4, 48, 6, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
            prop::collection::btree_map(any::<String>(), inner, 0..6)
                .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

/// Choices for one rendering, drawn from a seed: whitespace, key order, escapes, number forms.
struct Choices(u64);

impl Choices {
    fn next(&mut self, n: u64) -> u64 {
        // xorshift64: enough variety for layout choices, reproducible from the seed.
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % n
    }
    fn blank(&mut self, out: &mut String) {
        for _ in 0..self.next(3) {
            out.push([' ', '\t', '\n', '\r'][self.next(4) as usize]);
        }
    }
}

/// Writes `value` as valid JSON, laid out as `choices` say.
fn render(value: &Value, c: &mut Choices, out: &mut String) {
    c.blank(out);
    match value {
        Value::Null | Value::Bool(_) => out.push_str(&value.to_string()),
        Value::Number(n) => match n.as_f64() {
            // A float written as Rust's shortest exponent form (`1.5e-7`, `1e2`) or serde_json's.
            Some(f) if n.is_f64() && c.next(2) == 0 => out.push_str(&format!("{f:e}")),
            _ => out.push_str(&n.to_string()),
        },
        Value::String(s) => render_string(s, c, out),
        Value::Array(items) => {
            out.push('[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    c.blank(out);
                    out.push(',');
                }
                render(item, c, out);
                c.blank(out);
            }
            if items.is_empty() {
                c.blank(out);
            }
            out.push(']');
        }
        Value::Object(map) => {
            let mut entries: Vec<_> = map.iter().collect();
            // A shuffle: key order in the text must not matter.
            for i in (1..entries.len()).rev() {
                let j = c.next(i as u64 + 1) as usize;
                entries.swap(i, j);
            }
            out.push('{');
            for (i, (name, item)) in entries.into_iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                c.blank(out);
                render_string(name, c, out);
                c.blank(out);
                out.push(':');
                render(item, c, out);
                c.blank(out);
            }
            if map.is_empty() {
                c.blank(out);
            }
            out.push('}');
        }
    }
    c.blank(out);
}

/// A JSON string with each character written plainly or escaped (`\uXXXX`, surrogate pairs,
/// the short escapes), as the choices say; what must be escaped always is.
fn render_string(s: &str, c: &mut Choices, out: &mut String) {
    out.push('"');
    for ch in s.chars() {
        let must = ch == '"' || ch == '\\' || ch < ' ';
        if !must && c.next(4) != 0 {
            out.push(ch);
            continue;
        }
        match ch {
            '"' if c.next(2) == 0 => out.push_str("\\\""),
            '\\' if c.next(2) == 0 => out.push_str("\\\\"),
            '\n' if c.next(2) == 0 => out.push_str("\\n"),
            '\t' if c.next(2) == 0 => out.push_str("\\t"),
            '/' => out.push_str("\\/"),
            _ => {
                let mut units = [0u16; 2];
                for unit in ch.encode_utf16(&mut units) {
                    if c.next(2) == 0 {
                        out.push_str(&format!("\\u{unit:04x}"));
                    } else {
                        out.push_str(&format!("\\u{unit:04X}"));
                    }
                }
            }
        }
    }
    out.push('"');
}

fn canonical(text: &[u8]) -> Result<Vec<u8>, TestCaseError> {
    canonical_json(text, &[])
        .map_err(|e| TestCaseError::fail(format!("{e}: {}", String::from_utf8_lossy(text))))
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn layout_does_not_change_the_canonical_form(value in json_value(), a in any::<u64>(), b in any::<u64>()) {
        let compact = serde_json::to_vec(&value).map_err(|e| TestCaseError::fail(e.to_string()))?;
        let mut one = String::new();
        render(&value, &mut Choices(a | 1), &mut one);
        let mut two = String::new();
        render(&value, &mut Choices(b | 1), &mut two);
        let form = canonical(&compact)?;
        prop_assert_eq!(&canonical(one.as_bytes())?, &form, "{}", one);
        prop_assert_eq!(&canonical(two.as_bytes())?, &form, "{}", two);
    }

    #[test]
    fn the_canonical_form_parses_back_and_is_its_own_form(value in json_value(), seed in any::<u64>()) {
        let mut text = String::new();
        render(&value, &mut Choices(seed | 1), &mut text);
        let form = canonical(text.as_bytes())?;
        let back: Value = serde_json::from_slice(&form).map_err(|e| TestCaseError::fail(e.to_string()))?;
        prop_assert_eq!(&back, &value);
        prop_assert_eq!(canonical(&form)?, form.clone());
        // No whitespace outside strings: the form is as short as serde_json's compact output.
        let compact = serde_json::to_vec(&value).map_err(|e| TestCaseError::fail(e.to_string()))?;
        prop_assert!(form.len() <= compact.len(), "{} vs {}", String::from_utf8_lossy(&form), String::from_utf8_lossy(&compact));
    }

    #[test]
    fn ignored_fields_do_not_change_the_form(
        fields in prop::collection::btree_map("[a-z]{1,6}", json_value(), 0..4),
        ignored in prop::collection::btree_map("[A-Z]{1,6}", json_value(), 1..3),
    ) {
        let kept = Value::Object(fields.clone().into_iter().collect());
        let mut all = fields;
        all.extend(ignored.clone());
        let all = Value::Object(all.into_iter().collect());
        let names: Vec<String> = ignored.keys().cloned().collect();
        let with = canonical_json(all.to_string().as_bytes(), &names).map_err(|e| TestCaseError::fail(e.to_string()))?;
        prop_assert_eq!(with, canonical(kept.to_string().as_bytes())?);
    }

    #[test]
    fn a_repeated_key_is_an_error_however_it_is_escaped(value in json_value(), key in any::<String>(), seed in any::<u64>()) {
        let mut c = Choices(seed | 1);
        let (mut first, mut second) = (String::new(), String::new());
        render_string(&key, &mut c, &mut first);
        render_string(&key, &mut c, &mut second);
        let text = format!("{{{first}:1,{second}:{value}}}");
        prop_assert!(canonical_json(text.as_bytes(), &[]).is_err(), "{}", text);
    }

    #[test]
    fn arbitrary_bytes_never_panic(
        input in prop_oneof![
            prop::collection::vec(any::<u8>(), 0..200),
            prop::collection::vec(prop::sample::select(b"{}[]\",:0123456789.eE+-tfnrulas\\ ".to_vec()), 0..200),
            // Deep nesting: past serde_json's limit of 128 levels it is an error, not a stack
            // overflow.
            (0usize..400, any::<bool>()).prop_map(|(depth, objects)| {
                let (open, close) = if objects { ("{\"a\":", "}") } else { ("[", "]") };
                format!("{}1{}", open.repeat(depth), close.repeat(depth)).into_bytes()
            }),
        ],
    ) {
        if let Ok(form) = canonical_json(&input, &["user".to_string()]) {
            prop_assert!(serde_json::from_slice::<Value>(&form).is_ok());
        }
    }
}
