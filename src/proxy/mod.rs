//! The HTTP request path's own layers, and where a request enters.
//!
//! A request arrives on a client connection ([`listener`] accepts, the HTTP/1 wing serves it),
//! goes through [`entry::Entry`] (request id, routing) and then through its route's stack of
//! tower layers, which `src/stack.rs` assembles, outermost first, one concern each:
//!
//! 1. [`observe`]: metrics, access log, and turning errors into responses (via [`crate::error`]);
//! 2. [`limit::OverloadLayer`]: 503 past `limits.max_in_flight_requests`;
//! 3. [`limit::BodyLimitLayer`]: 413 past the request body limit;
//! 4. rate limits (429 or queue), on routes that set them (`ratelimit::layer`);
//! 5. cache and coalescing, on routes that enable them (`cache::layer`); then embeddings
//!    micro-batching, on routes with `batch:` (`llm::batch`); then the upstream's concurrency
//!    limit, when set (`ratelimit::concurrency`);
//! 6. [`retry`]: retries on another endpoint, within the upstream's budget, when set;
//! 7. [`timeout`]: first-byte and total deadlines, idle gaps in the response body;
//! 8. [`forward`]: header hygiene, endpoint choice and the pooled upstream call.

pub mod entry;
pub mod forward;
pub mod limit;
pub mod listener;
pub mod observe;
pub mod retry;
pub mod router;
pub mod timeout;
