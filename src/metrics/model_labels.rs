//! The `model` metric label, bounded: a route's configured allow-list, or else the first N
//! distinct models it sees; every other model is `other`. Clients choose model names, so
//! without a bound one client could create any number of series.

use std::collections::HashSet;
use std::sync::{Arc, RwLock};

/// The label of a request whose model is not known (no body, invalid JSON, no `model`).
pub const UNKNOWN: &str = "unknown";
/// The label of every model past the bound.
pub const OTHER: &str = "other";

pub struct ModelLabels {
    allowed: Option<HashSet<String>>,
    seen: RwLock<HashSet<Arc<str>>>,
    max: usize,
}

impl ModelLabels {
    /// `allowed` empty: the first `max` distinct models become labels.
    pub fn new(allowed: &[String], max: usize) -> Self {
        ModelLabels {
            allowed: (!allowed.is_empty()).then(|| allowed.iter().cloned().collect()),
            seen: RwLock::new(HashSet::new()),
            max,
        }
    }

    /// The label for `model`.
    pub fn label(&self, model: &str) -> Arc<str> {
        if model == UNKNOWN {
            return Arc::from(UNKNOWN);
        }
        if let Some(allowed) = &self.allowed {
            return Arc::from(if allowed.contains(model) {
                model
            } else {
                OTHER
            });
        }
        if let Ok(seen) = self.seen.read() {
            if let Some(label) = seen.get(model) {
                return label.clone();
            }
            if seen.len() >= self.max {
                return Arc::from(OTHER);
            }
        }
        let Ok(mut seen) = self.seen.write() else {
            return Arc::from(OTHER);
        };
        if let Some(label) = seen.get(model) {
            return label.clone();
        }
        if seen.len() >= self.max {
            return Arc::from(OTHER);
        }
        let label: Arc<str> = Arc::from(model);
        seen.insert(label.clone());
        label
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_n_models_then_other() {
        let labels = ModelLabels::new(&[], 2);
        assert_eq!(&*labels.label("a"), "a");
        assert_eq!(&*labels.label("b"), "b");
        assert_eq!(&*labels.label("c"), OTHER);
        assert_eq!(&*labels.label("a"), "a");
        assert_eq!(&*labels.label(UNKNOWN), UNKNOWN);
    }

    #[test]
    fn allow_list() {
        let labels = ModelLabels::new(&["gpt-4o".to_string()], 20);
        assert_eq!(&*labels.label("gpt-4o"), "gpt-4o");
        assert_eq!(&*labels.label("gpt-5"), OTHER);
    }
}
