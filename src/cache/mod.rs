//! The response cache and request de-duplication. [`key`] turns a request into a versioned,
//! tenant-isolated 256-bit key (what `x-sidelight-cache-key` shows), and [`rules`] decides whether
//! a request is a read that may be cached or shared at all (writes never are); both are pure and
//! synchronous. [`store`] keeps responses, [`coalesce`] shares identical in-flight requests, and
//! [`layer`] puts them together in a route's stack.

pub mod coalesce;
pub mod key;
pub mod layer;
pub mod rules;
pub mod store;
