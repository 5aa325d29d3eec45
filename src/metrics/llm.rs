//! The LLM family: requests, tokens and stream timing per LLM route and bounded `model` label,
//! stream faults and timeouts, and embeddings batching.

use super::model_labels::ModelLabels;
use super::{counter, gauge, histogram, BATCH_SIZE_BUCKETS, BATCH_WAIT_BUCKETS};
use super::{LATENCY_BUCKETS, LLM_TIMEOUT_KINDS, TOKEN_TIME_BUCKETS, TTFT_BUCKETS};
use crate::error::StreamFault;
use prometheus::Registry;
use prometheus::{Histogram, HistogramVec, IntCounter, IntCounterVec, IntGauge, IntGaugeVec};
use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};

/// The per-model series, cheap to clone into each route's handle.
#[derive(Clone)]
struct ModelSeries {
    tokens: IntCounterVec,
    cached_prompt_tokens: IntCounterVec,
    requests: IntCounterVec,
    time_to_first_token: HistogramVec,
    time_per_output_token: HistogramVec,
    stream_duration: HistogramVec,
    tokens_avoided: IntCounterVec,
    usage_estimated: IntCounterVec,
}

pub struct LlmFamily {
    models: ModelSeries,
    timeouts: IntCounterVec,
    stream_errors: IntCounterVec,
    batch_inputs: HistogramVec,
    batch_requests: HistogramVec,
    batch_wait: HistogramVec,
    cached_inputs: IntCounterVec,
    pending_inputs: IntGaugeVec,
    calls_saved: IntCounterVec,
    /// The bounded `model` label of each LLM route, shared by every worker (so the first N
    /// models are the first N of the process, not of each worker).
    model_labels: Mutex<HashMap<String, Arc<ModelLabels>>>,
}

impl LlmFamily {
    /// `calls_saved` is the cache family's `sidelight_upstream_calls_saved_total`.
    pub(super) fn register(r: &Registry, calls_saved: IntCounterVec) -> LlmFamily {
        LlmFamily {
            models: ModelSeries {
                tokens: counter(r, "sidelight_llm_tokens_total", "Tokens of LLM requests sent upstream, as the upstream reported them (or estimated), by kind: prompt (cached prompt tokens included) or completion; summing over kind counts every token once.", &["route", "model", "kind"]),
                cached_prompt_tokens: counter(r, "sidelight_llm_cached_prompt_tokens_total", "Prompt tokens the provider served from its own prompt cache (billed cheaper): a part of sidelight_llm_tokens_total{kind=\"prompt\"}, not in addition to it.", &["route", "model"]),
                requests: counter(r, "sidelight_llm_requests_total", "LLM requests, by model and status class (cache hits included).", &["route", "model", "status_class"]),
                time_to_first_token: histogram(r, "sidelight_llm_time_to_first_token_seconds", "Time from request arrival to the first generated token of an LLM stream (from upstream).", &["route", "model"], TTFT_BUCKETS),
                time_per_output_token: histogram(r, "sidelight_llm_time_per_output_token_seconds", "Time between output tokens of an LLM stream after the first (1 / output tokens per second).", &["route", "model"], TOKEN_TIME_BUCKETS),
                stream_duration: histogram(r, "sidelight_llm_stream_duration_seconds", "Time from request arrival to the end of an LLM stream (from upstream).", &["route", "model"], LATENCY_BUCKETS),
                tokens_avoided: counter(r, "sidelight_llm_tokens_avoided_total", "Tokens (prompt + completion) of LLM answers served without an upstream call, by source: cache or dedup: spend avoided.", &["route", "model", "source"]),
                usage_estimated: counter(r, "sidelight_llm_usage_estimated_total", "LLM responses whose usage the upstream did not report, so sidelight estimated it.", &["route", "model"]),
            },
            timeouts: counter(r, "sidelight_llm_timeouts_total", "LLM streams cut by a timeout, by kind: first_token (504 before anything was sent) or token_gap (stream ended with an error event).", &["route", "kind"]),
            stream_errors: counter(r, "sidelight_llm_stream_errors_total", "LLM streams that broke and were ended with a provider-shaped error event and a cut body (or, while held for the first token, answered 502 and retried), by kind: truncated (ended without its terminal event), malformed (an event whose JSON does not parse), upstream_closed (the upstream connection broke mid-stream).", &["route", "kind"]),
            batch_inputs: histogram(r, "sidelight_embeddings_batch_inputs", "Inputs per upstream embeddings call on batching routes.", &["route"], BATCH_SIZE_BUCKETS),
            batch_requests: histogram(r, "sidelight_embeddings_batch_requests", "Client requests merged into each upstream embeddings call on batching routes.", &["route"], BATCH_SIZE_BUCKETS),
            batch_wait: histogram(r, "sidelight_embeddings_batch_wait_seconds", "Time an embeddings request waited for its batch to be sent.", &["route"], BATCH_WAIT_BUCKETS),
            cached_inputs: counter(r, "sidelight_embeddings_cached_inputs_total", "Embedding inputs answered from the per-input cache (not sent upstream).", &["route"]),
            pending_inputs: gauge(r, "sidelight_embeddings_pending_inputs", "Embedding inputs waiting in batches not sent yet.", &["route"]),
            calls_saved,
            model_labels: Mutex::default(),
        }
    }

    /// An LLM route's per-model series, with the route's `model` label bound (`allowed`
    /// models, or the first `max` seen), created by the first worker that asks.
    pub fn route(&self, route: &str, allowed: &[String], max: usize) -> LlmRouteMetrics {
        let models = self
            .model_labels
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .entry(route.to_string())
            .or_insert_with(|| Arc::new(ModelLabels::new(allowed, max)))
            .clone();
        LlmRouteMetrics {
            route: Arc::from(route),
            models,
            series: self.models.clone(),
        }
    }

    /// A route's stream timeouts and faults; every kind starts at zero.
    pub fn stream(&self, route: &str) -> StreamMetrics {
        let [first_token_timeouts, gap_timeouts] =
            LLM_TIMEOUT_KINDS.map(|kind| self.timeouts.with_label_values(&[route, kind]));
        let fault = |f: StreamFault| self.stream_errors.with_label_values(&[route, f.label()]);
        StreamMetrics {
            first_token_timeouts,
            gap_timeouts,
            truncated: fault(StreamFault::Truncated),
            malformed: fault(StreamFault::Malformed),
            upstream_closed: fault(StreamFault::UpstreamClosed),
        }
    }

    /// The handles of a route with embeddings batching on.
    pub fn batch(&self, route: &str) -> BatchMetrics {
        BatchMetrics {
            inputs: self.batch_inputs.with_label_values(&[route]),
            requests: self.batch_requests.with_label_values(&[route]),
            wait: self.batch_wait.with_label_values(&[route]),
            cached_inputs: self.cached_inputs.with_label_values(&[route]),
            pending: self.pending_inputs.with_label_values(&[route]),
            saved_batch: self.calls_saved.with_label_values(&[route, "batch"]),
            saved_cache: self.calls_saved.with_label_values(&[route, "cache"]),
        }
    }
}

/// One LLM route's per-model series. Models are bounded labels, so these resolve per request.
pub struct LlmRouteMetrics {
    route: Arc<str>,
    models: Arc<ModelLabels>,
    series: ModelSeries,
}

impl LlmRouteMetrics {
    /// The `model` label for `model`, within the route's bound.
    pub fn model_label(&self, model: &str) -> Arc<str> {
        self.models.label(model)
    }

    pub fn requests(&self, model: &str, status_class: &str) -> IntCounter {
        self.series
            .requests
            .with_label_values(&[&self.route, model, status_class])
    }

    /// `kind`: prompt or completion.
    pub fn tokens(&self, model: &str, kind: &str) -> IntCounter {
        self.series
            .tokens
            .with_label_values(&[&self.route, model, kind])
    }

    pub fn cached_prompt_tokens(&self, model: &str) -> IntCounter {
        self.series
            .cached_prompt_tokens
            .with_label_values(&[&self.route, model])
    }

    pub fn usage_estimated(&self, model: &str) -> IntCounter {
        self.series
            .usage_estimated
            .with_label_values(&[&self.route, model])
    }

    /// `source`: cache or dedup.
    pub fn tokens_avoided(&self, model: &str, source: &str) -> IntCounter {
        self.series
            .tokens_avoided
            .with_label_values(&[&self.route, model, source])
    }

    pub fn time_to_first_token(&self, model: &str) -> Histogram {
        self.series
            .time_to_first_token
            .with_label_values(&[&self.route, model])
    }

    pub fn time_per_output_token(&self, model: &str) -> Histogram {
        self.series
            .time_per_output_token
            .with_label_values(&[&self.route, model])
    }

    pub fn stream_duration(&self, model: &str) -> Histogram {
        self.series
            .stream_duration
            .with_label_values(&[&self.route, model])
    }
}

/// A route's LLM stream timeouts and faults.
pub struct StreamMetrics {
    pub first_token_timeouts: IntCounter,
    pub gap_timeouts: IntCounter,
    pub truncated: IntCounter,
    pub malformed: IntCounter,
    pub upstream_closed: IntCounter,
}

pub struct BatchMetrics {
    pub inputs: Histogram,
    pub requests: Histogram,
    pub wait: Histogram,
    pub cached_inputs: IntCounter,
    pub pending: IntGauge,
    pub saved_batch: IntCounter,
    pub saved_cache: IntCounter,
}
