//! sidelight: an observability-first sidecar proxy for LLM APIs and databases.
//!
//! The binary (`src/main.rs`) is a thin shell around [`server::Sidelight`]; integration tests
//! and benchmarks start the same thing in-process.

pub mod admin;
pub mod cache;
pub mod config;
pub mod error;
pub mod health;
pub mod http;
pub mod http1;
pub mod llm;
pub mod metrics;
pub mod postgres;
pub mod proxy;
pub mod ratelimit;
pub mod server;
pub mod service;
pub mod shutdown;
pub mod stack;
pub mod telemetry;
pub mod testing;
pub mod upstream;

/// The error type boxed through hyper/tower bodies.
pub type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;
