//! The HTTP ground floor: body types and wrappers, header hygiene and per-request facts. It
//! imports nothing of sidelight's but the crate's error alias, so every feature can use it.

pub mod body;
pub mod headers;
pub mod meta;

pub use meta::{IdleHold, Peer, RequestMeta, UpstreamWait};
