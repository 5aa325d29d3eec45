//! What sidelight knows about LLM APIs (OpenAI and Anthropic wire formats). Only routes of
//! `kind: openai` or `kind: anthropic` use it; every other route stays a plain HTTP proxy whose
//! bodies are never parsed.

pub mod estimate;

use std::sync::Arc;

/// Tokens one LLM request used, as the upstream reported them (or as estimated when it did
/// not: `estimated` is then true).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Usage {
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
    /// Prompt tokens the provider served from its own prompt cache (billed cheaper).
    pub cached_tokens: u64,
    pub estimated: bool,
}

impl Usage {
    pub fn total(&self) -> u64 {
        self.prompt_tokens + self.completion_tokens
    }
}

/// Called once with a request's final usage, when its response (or stream) has been read to the
/// end. Layers outside the LLM accounting (the token rate limiter) put hooks in the request's
/// extensions; the accounting layer calls every hook it finds. A request that ends without usage
/// (an error, a client that went away) calls no hook.
#[derive(Clone, Default)]
pub struct UsageHooks(pub Vec<UsageHook>);

pub type UsageHook = Arc<dyn Fn(&Usage) + Send + Sync>;

impl UsageHooks {
    /// Adds `hook` to the request's hooks.
    pub fn add<B>(req: &mut http::Request<B>, hook: UsageHook) {
        match req.extensions_mut().get_mut::<UsageHooks>() {
            Some(hooks) => hooks.0.push(hook),
            None => {
                req.extensions_mut().insert(UsageHooks(vec![hook]));
            }
        }
    }

    pub fn call(&self, usage: &Usage) {
        for hook in &self.0 {
            hook(usage);
        }
    }
}
