pub mod mock_openai;

use std::time::Duration;

/// Parses `<n>ms` or `<n>s`, the durations the example binaries take on their command lines.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let bad = || format!("invalid duration {s:?} (expected <n>ms or <n>s)");
    if let Some(ms) = s.strip_suffix("ms") {
        ms.parse().map(Duration::from_millis).map_err(|_| bad())
    } else if let Some(secs) = s.strip_suffix('s') {
        secs.parse().map(Duration::from_secs).map_err(|_| bad())
    } else {
        Err(bad())
    }
}
