//! The shipped config files stay in step with the code. They are read as written (not built with
//! support::Config, which the other test files use): their text is what is tested.

use sidelight::config::{Config, ConfigError};

fn read(name: &str) -> String {
    std::fs::read_to_string(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("config")
            .join(name),
    )
    .unwrap()
}

#[test]
fn example_config_runs_without_any_environment() {
    let config =
        Config::from_yaml(&read("sidelight.yaml"), &|_| None).expect("valid with no env vars");
    assert_eq!(config.listeners[0].address.to_string(), "127.0.0.1:8080");
    assert_eq!(config.admin.address.to_string(), "127.0.0.1:9901");
    assert!(config
        .routes
        .iter()
        .any(|r| r.matcher.path_prefix == "/openai"));
}

#[test]
fn reference_config_uses_every_field_correctly() {
    // Every field parses; the only complaint is the illustrative CA file that does not exist.
    match Config::from_yaml(&read("reference.yaml"), &|name| {
        (name == "OPENAI_API_KEY").then(|| "sk".to_string())
    }) {
        Err(ConfigError::Invalid(errors)) => {
            assert_eq!(errors.len(), 1, "{errors:?}");
            assert_eq!(errors[0].path, "upstreams[0].tls.ca_file");
        }
        other => panic!("expected only the ca_file complaint, got {other:?}"),
    }
}
