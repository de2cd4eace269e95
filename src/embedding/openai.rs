//! The `openai` provider: any OpenAI-compatible `POST {base_url}/embeddings`
//! endpoint, called through async-openai's client and its request and
//! response types.
//!
//! Protocol: a batch is cut into chunks of `max_inputs` texts, one request
//! per chunk, sent one after the other (the embedder actor's pool is the
//! concurrency; chunks in parallel would only hit the rate limit sooner).
//! The response's `data` is put back in input order by `index`, checked
//! (one vector per input, each of the configured dimension, finite) and
//! L2-normalised; `tokens` is the sum of `usage.prompt_tokens`.
//!
//! Retries. async-openai's default executor wraps every call in its own
//! retry layer (3 retries, 100 ms doubling to 8 s, no jitter), and
//! `with_http_client` keeps that layer. Wrapping it from outside would
//! multiply the attempts, and it reports an exhausted 429 without the
//! `Retry-After` the server sent. So the crate's `middleware` feature is on
//! and [`Client::with_http_service`] replaces the executor with
//! [`RetryService`], a tower service of ours that owns the whole policy
//! while async-openai still builds the request (URL, headers, JSON body)
//! and parses the response:
//! - each attempt rebuilds the request from async-openai's replayable
//!   [`HttpRequestFactory`] and runs under `timeout_ms` (reqwest's total
//!   timeout, body included: the service reads the body before answering);
//! - retried: HTTP 429 (except `insufficient_quota`, which waiting cannot
//!   fix), 5xx, timeouts, connection and transport errors; never other 4xx,
//!   and never a 2xx whose body does not parse or has the wrong shape (the
//!   same request would get the same answer);
//! - the wait before retry `n` is the server's `retry-after-ms` or
//!   `Retry-After` (seconds; an HTTP date is ignored) when it sends one,
//!   capped at `max(backoff_max, 60 s)` so that one header cannot stall a
//!   pool slot for an hour; otherwise exponential backoff with full jitter:
//!   uniform in `[0, min(backoff_max, backoff_initial * 2^(n-1))]`;
//! - `retries` counts every retried attempt; after `max_attempts` attempts
//!   (the first included) the error carries the last HTTP status or cause.
//!
//! The API key lives in a [`SecretString`]: it is not in `Debug` output, and
//! it is cut out of any error text a server echoes back.

use std::{fmt, future::Future, pin::Pin, sync::Arc, task::Poll, time::Duration};

use async_openai::{
    Client,
    config::OpenAIConfig,
    error::{OpenAIError, WrappedError},
    middleware::HttpRequestFactory,
    types::embeddings::{CreateEmbeddingRequest, EmbeddingInput},
};
use prometheus::IntCounter;
use rand::Rng;
use reqwest::{StatusCode, header::HeaderMap};
use secrecy::{ExposeSecret, SecretString};

use super::{EmbedError, Embeddings};
use crate::{domain::vector, settings::OpenAiSettings};

/// The longest wait a server's `Retry-After` can impose when `backoff_max`
/// is shorter.
const RETRY_AFTER_CAP: Duration = Duration::from_secs(60);

/// The most characters of an error body quoted in an error message.
const QUOTED_BODY_CHARS: usize = 300;

/// Why the provider gave no vectors (see [`EmbedError::Provider`]).
#[derive(Debug, thiserror::Error)]
pub enum ProviderError {
    /// Settings no request could succeed with.
    #[error("invalid settings: {0}")]
    Settings(String),
    #[error(
        "no rustls crypto provider is installed: call \
         rustls::crypto::ring::default_provider().install_default() at start"
    )]
    NoCryptoProvider,
    #[error("cannot build the HTTP client: {0}")]
    HttpClient(#[source] reqwest::Error),
    /// The request failed ([`RetryService`] wrote its message) or its 2xx
    /// body did not parse.
    #[error("{}", describe_openai_error(.0))]
    Request(#[source] OpenAIError),
    #[error("malformed response: the indices of the {0} vectors are not 0..{0}")]
    Indices(usize),
    #[error("malformed response: a vector has non-finite values")]
    NonFinite,
}

pub struct OpenAiEmbedder {
    client: Client<OpenAIConfig>,
    model: String,
    base_url: String,
    /// What every vector must have (`embedder.dimensions`).
    dimensions: usize,
    /// Sent as the request's `dimensions`; `None` when the model decides.
    request_dimensions: Option<u32>,
    max_inputs: usize,
    policy: RetryPolicy,
}

impl fmt::Debug for OpenAiEmbedder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("OpenAiEmbedder")
            .field("base_url", &self.base_url)
            .field("model", &self.model)
            .field("dimensions", &self.dimensions)
            .field("request_dimensions", &self.request_dimensions)
            .field("max_inputs", &self.max_inputs)
            .field("policy", &self.policy)
            .finish_non_exhaustive()
    }
}

impl OpenAiEmbedder {
    /// Builds the client. Fails on settings no request could succeed with,
    /// and when no rustls crypto provider is installed (reqwest is built
    /// with `rustls-no-provider` and would panic).
    pub fn new(settings: &OpenAiSettings, dimensions: usize, retries: IntCounter) -> Result<Self, EmbedError> {
        let invalid = |what: String| Err(ProviderError::Settings(what).into());
        if dimensions == 0 {
            return invalid("embedder.dimensions must be at least 1".into());
        }
        if settings.request_dimensions != 0 && settings.request_dimensions != dimensions {
            return invalid(format!(
                "embedder.openai.request_dimensions ({}) must be 0 or equal embedder.dimensions ({dimensions})",
                settings.request_dimensions
            ));
        }
        let Ok(request_dimensions) = u32::try_from(settings.request_dimensions) else {
            return invalid("embedder.openai.request_dimensions is too large".into());
        };
        if settings.max_inputs == 0 || settings.max_attempts == 0 || settings.timeout_ms == 0 {
            return invalid("embedder.openai.max_inputs, max_attempts and timeout_ms must be at least 1".into());
        }
        // async-openai builds the Authorization header with `unwrap`: a key
        // with a newline would panic on every request instead of failing here.
        let key = settings.api_key.expose_secret();
        if reqwest::header::HeaderValue::from_str(&format!("Bearer {key}")).is_err() {
            return invalid("embedder.openai.api_key has characters not allowed in an HTTP header".into());
        }
        if rustls::crypto::CryptoProvider::get_default().is_none() {
            return Err(ProviderError::NoCryptoProvider.into());
        }

        let policy = RetryPolicy {
            max_attempts: settings.max_attempts,
            timeout: Duration::from_millis(settings.timeout_ms),
            backoff_initial: Duration::from_millis(settings.backoff_initial_ms),
            backoff_max: Duration::from_millis(settings.backoff_max_ms),
        };
        let http = reqwest::Client::builder().timeout(policy.timeout).build().map_err(ProviderError::HttpClient)?;
        let base_url = settings.base_url.trim_end_matches('/').to_owned();
        // Organisation and project are cleared: OpenAIConfig::new() reads
        // them from OPENAI_* variables, and the settings are the only source.
        let config = OpenAIConfig::new().with_api_base(&base_url).with_api_key(key).with_org_id("").with_project_id("");
        let service = RetryService {
            http: http.clone(),
            policy: policy.clone(),
            retries,
            key: Arc::new(settings.api_key.clone()),
        };
        Ok(Self {
            client: Client::build(http, config).with_http_service(service),
            model: settings.model.clone(),
            base_url,
            dimensions,
            request_dimensions: (request_dimensions > 0).then_some(request_dimensions),
            max_inputs: settings.max_inputs,
            policy,
        })
    }

    pub fn model(&self) -> &str {
        &self.model
    }

    /// Embeds `texts`: one request per `max_inputs` texts, vectors in input
    /// order, L2-normalised.
    #[tracing::instrument(skip_all, fields(texts = texts.len(), model = %self.model))]
    pub async fn embed(&self, texts: &[String]) -> Result<Embeddings, EmbedError> {
        let mut all = Embeddings { vectors: Vec::with_capacity(texts.len()), tokens: 0 };
        for chunk in texts.chunks(self.max_inputs) {
            let Embeddings { vectors, tokens } = self.embed_chunk(chunk).await?;
            all.vectors.extend(vectors);
            all.tokens += tokens;
        }
        Ok(all)
    }

    /// One request (retries included) for at most `max_inputs` texts.
    async fn embed_chunk(&self, texts: &[String]) -> Result<Embeddings, EmbedError> {
        let request = CreateEmbeddingRequest {
            model: self.model.clone(),
            input: EmbeddingInput::StringArray(texts.to_vec()),
            dimensions: self.request_dimensions,
            ..Default::default()
        };
        let response = self.client.embeddings().create(request).await.map_err(ProviderError::Request)?;
        let tokens = u64::from(response.usage.prompt_tokens);
        let vectors = order_and_check(response.data, texts.len(), self.dimensions)?;
        Ok(Embeddings { vectors, tokens })
    }
}

/// Puts the response's vectors in input order and checks their number,
/// indices, dimension and values; normalises them.
fn order_and_check(
    mut data: Vec<async_openai::types::embeddings::Embedding>,
    expected: usize,
    dimensions: usize,
) -> Result<Vec<Vec<f32>>, EmbedError> {
    if data.len() != expected {
        return Err(EmbedError::Count { expected, got: data.len() });
    }
    data.sort_unstable_by_key(|e| e.index);
    if data.iter().enumerate().any(|(i, e)| e.index as usize != i) {
        return Err(ProviderError::Indices(expected).into());
    }
    data.into_iter()
        .map(|e| {
            let mut v = e.embedding;
            if v.len() != dimensions {
                return Err(EmbedError::Dimensions { expected: dimensions, got: v.len() });
            }
            if !v.iter().all(|x| x.is_finite()) {
                return Err(ProviderError::NonFinite.into());
            }
            vector::normalise(&mut v);
            Ok(v)
        })
        .collect()
}

/// The message of what async-openai returns. [`RetryService`] already
/// wrote the message of every HTTP and transport failure; what is left is
/// a 2xx body that does not parse.
fn describe_openai_error(error: &OpenAIError) -> String {
    match error {
        OpenAIError::Boxed(failed) => failed.to_string(),
        // The body itself is left out: it can be megabytes of vectors.
        OpenAIError::JSONDeserialize(e, _body) => format!("malformed response body: {e} (not retried)"),
        other => other.to_string(),
    }
}

/// Attempts, timeout and backoff of one request.
#[derive(Debug, Clone)]
struct RetryPolicy {
    max_attempts: u32,
    timeout: Duration,
    backoff_initial: Duration,
    backoff_max: Duration,
}

impl RetryPolicy {
    /// The longest backoff before retry `retry` (1 for the first retry):
    /// `backoff_initial * 2^(retry-1)`, at most `backoff_max`.
    fn backoff_ceiling(&self, retry: u32) -> Duration {
        let factor = 1u32.checked_shl(retry.saturating_sub(1)).unwrap_or(u32::MAX);
        self.backoff_initial.saturating_mul(factor).min(self.backoff_max)
    }

    /// The wait before retry `retry`: the server's `Retry-After` when it
    /// sent one (capped), else a uniformly random ("full jitter") share of
    /// the backoff ceiling, so that clients that failed together do not
    /// retry together.
    fn delay(&self, retry: u32, retry_after: Option<Duration>) -> Duration {
        if let Some(wait) = retry_after {
            return wait.min(self.backoff_max.max(RETRY_AFTER_CAP));
        }
        let ceiling = u64::try_from(self.backoff_ceiling(retry).as_millis()).unwrap_or(u64::MAX);
        Duration::from_millis(rand::rng().random_range(0..=ceiling))
    }
}

/// The server's requested wait: `retry-after-ms` (OpenAI sends it), else
/// `Retry-After` in seconds. HTTP dates and garbage are ignored.
fn retry_after(headers: &HeaderMap) -> Option<Duration> {
    let header = |name: &str| headers.get(name)?.to_str().ok()?.trim().parse::<f64>().ok();
    let seconds = header("retry-after-ms").map(|ms| ms / 1000.0).or_else(|| header("retry-after"))?;
    Duration::try_from_secs_f64(seconds).ok()
}

/// Whether a non-2xx status is worth another attempt: rate limits (except
/// an exhausted quota) and server errors.
fn retryable_status(status: StatusCode, body: &[u8]) -> bool {
    if status == StatusCode::TOO_MANY_REQUESTS {
        let quota = serde_json::from_slice::<WrappedError>(body)
            .is_ok_and(|w| [w.error.r#type, w.error.code].iter().flatten().any(|t| t == "insufficient_quota"));
        return !quota;
    }
    status.is_server_error()
}

/// How one attempt ended.
enum Attempt {
    /// A 2xx answer, body read: async-openai parses it.
    Answered(reqwest::Response),
    /// Retrying may help.
    Transient { cause: String, retry_after: Option<Duration> },
    /// Retrying cannot help.
    Permanent(String),
}

/// The executor installed in async-openai's client: runs attempts under
/// [`RetryPolicy`]; see the module documentation.
#[derive(Clone)]
struct RetryService {
    http: reqwest::Client,
    policy: RetryPolicy,
    retries: IntCounter,
    /// Only to cut the key out of error texts.
    key: Arc<SecretString>,
}

/// The last failure of a request, as the embedder reports it.
#[derive(Debug, thiserror::Error)]
#[error("{cause} ({outcome})")]
struct RequestFailed {
    cause: String,
    outcome: String,
}

type ServiceFuture = Pin<Box<dyn Future<Output = Result<reqwest::Response, OpenAIError>> + Send>>;

impl tower::Service<HttpRequestFactory> for RetryService {
    type Response = reqwest::Response;
    type Error = OpenAIError;
    type Future = ServiceFuture;

    fn poll_ready(&mut self, _cx: &mut std::task::Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: HttpRequestFactory) -> Self::Future {
        let this = self.clone();
        Box::pin(async move { this.run(request).await })
    }
}

impl RetryService {
    async fn run(self, request: HttpRequestFactory) -> Result<reqwest::Response, OpenAIError> {
        let max = self.policy.max_attempts;
        let mut attempt = 1;
        loop {
            let failed = |cause: String, outcome: String| {
                OpenAIError::Boxed(Box::new(RequestFailed { cause: self.redact(cause), outcome }))
            };
            match self.attempt(&request).await? {
                Attempt::Answered(response) => return Ok(response),
                Attempt::Permanent(cause) => return Err(failed(cause, "not retried".into())),
                Attempt::Transient { cause, .. } if attempt >= max => {
                    let plural = if max == 1 { "" } else { "s" };
                    return Err(failed(cause, format!("gave up after {max} attempt{plural}")));
                }
                Attempt::Transient { cause, retry_after } => {
                    let delay = self.policy.delay(attempt, retry_after);
                    tracing::warn!(
                        attempt,
                        max_attempts = max,
                        delay_ms = delay.as_millis() as u64,
                        cause = %self.redact(cause),
                        "embedding request failed, retrying"
                    );
                    self.retries.inc();
                    tokio::time::sleep(delay).await;
                    attempt += 1;
                }
            }
        }
    }

    /// One HTTP exchange, body included (so that a stalled body is a
    /// timeout of this attempt, retried, not an error after it).
    async fn attempt(&self, request: &HttpRequestFactory) -> Result<Attempt, OpenAIError> {
        let request = request.build().await?;
        let response = match self.http.execute(request).await {
            Ok(response) => response,
            Err(e) => return Ok(self.transport_failure(e)),
        };
        let (status, version, headers) = (response.status(), response.version(), response.headers().clone());
        let body = match response.bytes().await {
            Ok(body) => body,
            Err(e) => return Ok(self.transport_failure(e)),
        };
        if status.is_success() {
            let mut answer = http::Response::new(body);
            *answer.status_mut() = status;
            *answer.version_mut() = version;
            *answer.headers_mut() = headers;
            return Ok(Attempt::Answered(answer.into()));
        }
        let cause = describe_status(status, &body);
        Ok(if retryable_status(status, &body) {
            Attempt::Transient { cause, retry_after: retry_after(&headers) }
        } else {
            Attempt::Permanent(cause)
        })
    }

    fn transport_failure(&self, error: reqwest::Error) -> Attempt {
        if error.is_builder() || error.is_redirect() {
            return Attempt::Permanent(error_chain(error));
        }
        let cause = if error.is_timeout() {
            format!("no complete answer within {} ms", self.policy.timeout.as_millis())
        } else {
            error_chain(error)
        };
        Attempt::Transient { cause, retry_after: None }
    }

    /// `text` without the API key, should a server have echoed it.
    fn redact(&self, text: String) -> String {
        let key = self.key.expose_secret();
        if key.is_empty() { text } else { text.replace(key, "[REDACTED]") }
    }
}

/// `HTTP 429 Too Many Requests: <the server's error message>`.
fn describe_status(status: StatusCode, body: &[u8]) -> String {
    let detail = match serde_json::from_slice::<WrappedError>(body) {
        Ok(wrapped) => wrapped.error.to_string(),
        Err(_) => {
            let text = String::from_utf8_lossy(body);
            let text = text.split_whitespace().collect::<Vec<_>>().join(" ");
            match text.char_indices().nth(QUOTED_BODY_CHARS) {
                Some((cut, _)) => format!("{}…", &text[..cut]),
                None => text,
            }
        }
    };
    if detail.is_empty() { format!("HTTP {status}") } else { format!("HTTP {status}: {detail}") }
}

/// A reqwest error and its sources, without the URL (the base URL is in the
/// settings; a URL may carry credentials).
fn error_chain(error: reqwest::Error) -> String {
    let error = error.without_url();
    let mut text = error.to_string();
    let mut source = std::error::Error::source(&error);
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(initial_ms: u64, max_ms: u64) -> RetryPolicy {
        RetryPolicy {
            max_attempts: 5,
            timeout: Duration::from_secs(1),
            backoff_initial: Duration::from_millis(initial_ms),
            backoff_max: Duration::from_millis(max_ms),
        }
    }

    #[test]
    fn backoff_doubles_up_to_the_cap_and_jitters_below_it() {
        let p = policy(100, 1000);
        let ceilings: Vec<u128> = (1..=6).map(|n| p.backoff_ceiling(n).as_millis()).collect();
        assert_eq!(ceilings, [100, 200, 400, 800, 1000, 1000]);
        assert_eq!(p.backoff_ceiling(200), Duration::from_millis(1000), "no overflow");
        for retry in 1..=6 {
            for _ in 0..50 {
                assert!(p.delay(retry, None) <= p.backoff_ceiling(retry));
            }
        }
        let spread: std::collections::HashSet<_> = (0..50).map(|_| p.delay(3, None)).collect();
        assert!(spread.len() > 1, "full jitter varies the delay");
    }

    #[test]
    fn retry_after_wins_over_backoff_but_is_capped() {
        let p = policy(10, 50);
        assert_eq!(p.delay(1, Some(Duration::from_secs(2))), Duration::from_secs(2));
        assert_eq!(p.delay(1, Some(Duration::from_secs(3600))), RETRY_AFTER_CAP);
        let long = policy(10, 120_000);
        assert_eq!(long.delay(1, Some(Duration::from_secs(90))), Duration::from_secs(90));
    }

    #[test]
    fn retry_after_headers_parse() {
        let headers = |pairs: &[(&'static str, &'static str)]| {
            let mut h = HeaderMap::new();
            for (k, v) in pairs {
                h.insert(*k, v.parse().expect("a valid header value"));
            }
            h
        };
        assert_eq!(retry_after(&headers(&[("retry-after", "2")])), Some(Duration::from_secs(2)));
        assert_eq!(retry_after(&headers(&[("retry-after", "0.5")])), Some(Duration::from_millis(500)));
        assert_eq!(
            retry_after(&headers(&[("retry-after", "20"), ("retry-after-ms", "250")])),
            Some(Duration::from_millis(250))
        );
        assert_eq!(retry_after(&headers(&[("retry-after", "Wed, 21 Oct 2015 07:28:00 GMT")])), None);
        assert_eq!(retry_after(&headers(&[("retry-after", "-3")])), None);
        assert_eq!(retry_after(&headers(&[])), None);
    }

    #[test]
    fn only_rate_limits_and_server_errors_are_retried() {
        let quota =
            br#"{"error":{"message":"quota","type":"insufficient_quota","param":null,"code":"insufficient_quota"}}"#;
        let rate = br#"{"error":{"message":"slow down","type":"requests","param":null,"code":"rate_limit_exceeded"}}"#;
        assert!(retryable_status(StatusCode::TOO_MANY_REQUESTS, rate));
        assert!(retryable_status(StatusCode::TOO_MANY_REQUESTS, b"not json"));
        assert!(!retryable_status(StatusCode::TOO_MANY_REQUESTS, quota));
        for code in [500, 502, 503, 504] {
            assert!(retryable_status(StatusCode::from_u16(code).expect("a valid status"), b""));
        }
        for code in [400, 401, 403, 404, 408, 413, 422] {
            assert!(!retryable_status(StatusCode::from_u16(code).expect("a valid status"), b""));
        }
    }

    #[test]
    fn status_descriptions_quote_the_server_briefly() {
        let body = br#"{"error":{"message":"bad input","type":"invalid_request_error","param":null,"code":null}}"#;
        assert_eq!(
            describe_status(StatusCode::BAD_REQUEST, body),
            "HTTP 400 Bad Request: invalid_request_error: bad input"
        );
        assert_eq!(describe_status(StatusCode::BAD_GATEWAY, b""), "HTTP 502 Bad Gateway");
        let long = "x".repeat(1000);
        let described = describe_status(StatusCode::SERVICE_UNAVAILABLE, long.as_bytes());
        assert!(described.chars().count() < QUOTED_BODY_CHARS + 40, "{described}");
    }

    fn embedding(index: u32, embedding: Vec<f32>) -> async_openai::types::embeddings::Embedding {
        async_openai::types::embeddings::Embedding { index, object: "embedding".into(), embedding }
    }

    #[test]
    fn vectors_come_back_in_input_order_normalised_and_checked() {
        let data = vec![embedding(1, vec![0.0, 2.0]), embedding(0, vec![3.0, 4.0])];
        assert_eq!(order_and_check(data, 2, 2).expect("a valid response"), vec![vec![0.6, 0.8], vec![0.0, 1.0]]);
        let count = order_and_check(vec![embedding(0, vec![1.0, 0.0])], 2, 2);
        assert!(matches!(count, Err(EmbedError::Count { expected: 2, got: 1 })));
        let dims = order_and_check(vec![embedding(0, vec![1.0, 0.0, 0.0])], 1, 2);
        assert!(matches!(dims, Err(EmbedError::Dimensions { expected: 2, got: 3 })));
        let duplicate = order_and_check(vec![embedding(0, vec![1.0, 0.0]), embedding(0, vec![1.0, 0.0])], 2, 2);
        assert!(matches!(duplicate, Err(EmbedError::Provider(_))));
        let infinite = order_and_check(vec![embedding(0, vec![f32::INFINITY, 0.0])], 1, 2);
        assert!(matches!(infinite, Err(EmbedError::Provider(_))));
    }

    #[test]
    fn the_embedder_and_its_futures_cross_threads() {
        fn send_sync<T: Send + Sync>(_: &T) {}
        fn send<T: Send>(_: &T) {}
        let _ = rustls::crypto::ring::default_provider().install_default();
        let settings = OpenAiSettings {
            base_url: "http://127.0.0.1:9/v1".into(),
            api_key: "sk-test".to_owned().into(),
            model: "m".into(),
            request_dimensions: 0,
            max_inputs: 16,
            price_per_1k_tokens: 0.0,
            timeout_ms: 100,
            max_attempts: 1,
            backoff_initial_ms: 1,
            backoff_max_ms: 1,
        };
        let embedder = OpenAiEmbedder::new(&settings, 4, IntCounter::new("r", "r").expect("a valid counter"))
            .expect("valid settings");
        send_sync(&embedder);
        let texts = vec!["a".to_owned()];
        send(&embedder.embed(&texts));
    }
}
