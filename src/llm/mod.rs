//! What sidelight knows about LLM APIs (OpenAI and Anthropic wire formats). Only routes of
//! `kind: openai` or `kind: anthropic` use it; every other route stays a plain HTTP proxy whose
//! bodies are never parsed.
