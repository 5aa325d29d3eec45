//! The HTTP request path.
//!
//! A request arrives on a client connection ([`listener`] accepts, [`crate::http1::server`] serves:
//! HTTP/1.1 by sidelight's own loop, h2c by hyper), goes through [`entry::Entry`] (request id, routing)
//! and then through its route's stack of tower layers, outermost first, one concern each:
//!
//! 1. [`observe`]: metrics, access log, and turning errors into responses (via [`crate::error`]);
//! 2. [`limit::OverloadLayer`]: 503 past `limits.max_in_flight_requests`;
//! 3. [`limit::BodyLimitLayer`]: 413 past the request body limit;
//! 4. [`crate::ratelimit::layer`]: rate limits (429 or queue), on routes that set them;
//! 5. [`crate::cache::layer`]: cache and coalescing, on routes that enable them;
//!    then [`crate::llm::batch`]: embeddings micro-batching, on routes with `batch:`;
//!    then [`crate::ratelimit::concurrency`]: the upstream's concurrency limit, when set;
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
