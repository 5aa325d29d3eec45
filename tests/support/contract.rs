//! The metrics contract: the `sidelight_*` names that the Grafana dashboards (`dashboards/*.json`)
//! and the Prometheus rules (`dashboards/alerts.yml` and its promtool tests) query, checked
//! against what a running sidelight exports.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

/// Files whose expressions make up the contract.
pub fn contract_files() -> Vec<PathBuf> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("dashboards");
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .expect("dashboards/")
        .map(|e| e.expect("dashboards/ entry").path())
        .filter(|p| matches!(p.extension().and_then(|e| e.to_str()), Some("json" | "yml")))
        .collect();
    files.sort();
    files
}

/// Every (file, metric name) with the given prefix the contract files mention. JSON files
/// must parse (a broken dashboard does not import), YAML files too.
pub fn queried(prefix: &str) -> Vec<(String, String)> {
    let re = regex::Regex::new(&format!(r"{prefix}[a-z0-9_]+")).expect("regex");
    let mut out = Vec::new();
    for path in contract_files() {
        let text = std::fs::read_to_string(&path).expect("read a contract file");
        let file = path
            .file_name()
            .unwrap_or_default()
            .to_string_lossy()
            .to_string();
        if file.ends_with(".json") {
            serde_json::from_str::<serde_json::Value>(&text)
                .unwrap_or_else(|e| panic!("{file} is not valid JSON: {e}"));
        } else {
            serde_yaml::from_str::<serde_yaml::Value>(&text)
                .unwrap_or_else(|e| panic!("{file} is not valid YAML: {e}"));
        }
        for m in re.find_iter(&text) {
            out.push((file.clone(), m.as_str().to_string()));
        }
    }
    out
}

/// The metric families named in `# TYPE` lines of a /metrics text.
pub fn exported(metrics_text: &str) -> BTreeSet<String> {
    metrics_text
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| l.split_whitespace().next())
        .map(str::to_string)
        .collect()
}

/// The exported family `name` belongs to (a histogram's `_bucket`, `_sum`, `_count` series
/// belong to it), or None.
pub fn family<'a>(exported: &BTreeSet<String>, name: &'a str) -> Option<&'a str> {
    if exported.contains(name) {
        return Some(name);
    }
    ["_bucket", "_sum", "_count"]
        .iter()
        .find_map(|s| name.strip_suffix(s).filter(|b| exported.contains(*b)))
}
