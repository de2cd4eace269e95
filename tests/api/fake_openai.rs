//! A fake OpenAI-compatible embeddings server for tests, with scriptable
//! faults.
//!
//! `FakeOpenAi::start()` serves `POST /v1/embeddings` on 127.0.0.1 (a free
//! port) from its own thread and actix system, so it works under any test
//! runtime and stops when dropped. It answers the real response shape with
//! deterministic vectors (`HashEmbedder`: similar texts get similar
//! vectors) of the request's `dimensions`, or of the server's default,
//! and counts `words + 1` tokens per input.
//!
//! Protocol, per request: every request is recorded (arrival instant,
//! `Authorization`, model, inputs, dimensions); a wrong or missing key
//! answers 401 and an invalid body 400, as OpenAI does; otherwise the next
//! pushed [`Fault`], if any, is consumed and decides the answer; with no
//! fault left, the answer is normal.

use std::{
    collections::VecDeque,
    net::TcpListener,
    sync::{Arc, Mutex, MutexGuard},
    time::{Duration, Instant},
};

use actix_web::{App, HttpRequest, HttpResponse, HttpServer, dev::ServerHandle, http::header, web};
use clusterd::{embedding::HashEmbedder, settings::OpenAiSettings};
use serde::Deserialize;
use serde_json::{Value, json};

/// The key the fake accepts (`Authorization: Bearer FAKE_API_KEY`).
pub const FAKE_API_KEY: &str = "sk-fake-3f9c2a7b41d04e8e";
/// What the fake calls its model by default.
pub const FAKE_MODEL: &str = "text-embedding-3-small";
/// Dimension of the vectors when the request does not send `dimensions`.
pub const DEFAULT_DIMENSIONS: usize = 384;

/// What the fake does with one request instead of answering normally.
#[derive(Debug, Clone, PartialEq)]
pub enum Fault {
    /// This HTTP status with an OpenAI-style error body, and a
    /// `Retry-After: <seconds>` header when given.
    Status { code: u16, retry_after: Option<u64> },
    /// Waits this long, then answers normally (slower than a client
    /// timeout: the client has given up by then).
    Delay(Duration),
    /// 200 with a body that is not JSON.
    Malformed,
    /// 200 with JSON that is not an embeddings response.
    WrongShape,
    /// 200, a valid response with one vector fewer than inputs.
    WrongCount,
    /// 200, a valid response whose vectors have one dimension too many.
    WrongDimensions,
    /// 200, a normal response with `data` in reverse order (indices
    /// unchanged): clients must order by `index`.
    Reversed,
}

/// One request as the fake received it.
#[derive(Debug, Clone)]
pub struct Recorded {
    pub at: Instant,
    /// The `Authorization` header as sent.
    pub authorization: Option<String>,
    /// `None` when the body did not parse.
    pub model: Option<String>,
    pub inputs: Vec<String>,
    pub dimensions: Option<usize>,
    /// The fault this request consumed, if any.
    pub fault: Option<Fault>,
}

#[derive(Default)]
struct State {
    faults: VecDeque<Fault>,
    requests: Vec<Recorded>,
}

struct Shared {
    state: Mutex<State>,
    api_key: String,
    default_dimensions: usize,
}

impl Shared {
    fn state(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock is a test bug; the state is still usable.
        self.state.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

pub struct FakeOpenAi {
    /// `http://127.0.0.1:PORT/v1`, the `base_url` of the settings.
    pub base_url: String,
    pub api_key: String,
    shared: Arc<Shared>,
    handle: ServerHandle,
}

impl FakeOpenAi {
    pub async fn start() -> Self {
        Self::start_with_dimensions(DEFAULT_DIMENSIONS).await
    }

    /// A fake whose vectors have `dimensions` unless a request asks otherwise.
    pub async fn start_with_dimensions(dimensions: usize) -> Self {
        install_crypto_provider();
        let shared = Arc::new(Shared {
            state: Mutex::default(),
            api_key: FAKE_API_KEY.to_owned(),
            default_dimensions: dimensions,
        });
        let listener = TcpListener::bind("127.0.0.1:0").expect("a free loopback port");
        let port = listener.local_addr().expect("a bound listener has an address").port();
        let (handle_tx, handle_rx) = tokio::sync::oneshot::channel();
        let data = web::Data::from(shared.clone());
        std::thread::Builder::new()
            .name("fake-openai".into())
            .spawn(move || {
                actix_web::rt::System::new().block_on(async move {
                    let server = HttpServer::new(move || {
                        App::new()
                            .app_data(data.clone())
                            .app_data(web::PayloadConfig::new(64 << 20))
                            .route("/v1/embeddings", web::post().to(embeddings))
                    })
                    .workers(1)
                    .disable_signals()
                    .shutdown_timeout(0)
                    .listen(listener)
                    .expect("the fake listens on its socket")
                    .run();
                    // The receiver waits in start(); it is gone only if the test already panicked.
                    let _ = handle_tx.send(server.handle());
                    server.await
                })
            })
            .expect("spawn the fake's thread");
        let handle = handle_rx.await.expect("the fake server starts");
        Self { base_url: format!("http://127.0.0.1:{port}/v1"), api_key: FAKE_API_KEY.to_owned(), shared, handle }
    }

    /// Settings of an embedder pointed at this fake: the right key, its
    /// model, and short timeouts and backoffs so that fault tests are quick.
    pub fn settings(&self) -> OpenAiSettings {
        OpenAiSettings {
            base_url: self.base_url.clone(),
            api_key: self.api_key.clone().into(),
            model: FAKE_MODEL.to_owned(),
            request_dimensions: 0,
            max_inputs: 2048,
            price_per_1k_tokens: 0.00002,
            timeout_ms: 300,
            max_attempts: 3,
            backoff_initial_ms: 10,
            backoff_max_ms: 50,
        }
    }

    /// Queues a fault for the next request that reaches it.
    pub fn push(&self, fault: Fault) {
        self.shared.state().faults.push_back(fault);
    }

    /// Every request received so far, in arrival order.
    pub fn requests(&self) -> Vec<Recorded> {
        self.shared.state().requests.clone()
    }

    pub fn request_count(&self) -> usize {
        self.shared.state().requests.len()
    }

    /// Faults pushed and not consumed yet.
    pub fn pending_faults(&self) -> usize {
        self.shared.state().faults.len()
    }

    /// The vector the fake answers for `text` at `dimensions`.
    pub fn vector(text: &str, dimensions: usize) -> Vec<f32> {
        HashEmbedder::new(dimensions).embed_one(text)
    }

    /// The tokens the fake counts for `text`.
    pub fn tokens(text: &str) -> u64 {
        text.split_whitespace().count() as u64 + 1
    }
}

impl Drop for FakeOpenAi {
    fn drop(&mut self) {
        // stop() sends the command at once; its future only waits for completion.
        drop(self.handle.stop(false));
    }
}

/// reqwest is built without a crypto provider (`rustls-no-provider`); the
/// daemon's main installs ring, tests do it here. A provider installed
/// before is kept.
pub fn install_crypto_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

#[derive(Deserialize)]
struct EmbeddingsRequest {
    model: String,
    input: Input,
    dimensions: Option<usize>,
    encoding_format: Option<String>,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum Input {
    One(String),
    Many(Vec<String>),
}

async fn embeddings(shared: web::Data<Shared>, request: HttpRequest, body: web::Bytes) -> HttpResponse {
    let authorization = request.headers().get(header::AUTHORIZATION).and_then(|v| v.to_str().ok()).map(str::to_owned);
    let parsed = serde_json::from_slice::<EmbeddingsRequest>(&body);
    let authorised = authorization.as_deref() == Some(format!("Bearer {}", shared.api_key).as_str());
    let (model, inputs, dimensions) = match &parsed {
        Ok(r) => (
            Some(r.model.clone()),
            match &r.input {
                Input::One(text) => vec![text.clone()],
                Input::Many(texts) => texts.clone(),
            },
            r.dimensions,
        ),
        Err(_) => (None, Vec::new(), None),
    };
    let invalid = match &parsed {
        Err(e) => Some(format!("We could not parse the JSON body of your request: {e}")),
        Ok(_) if inputs.is_empty() || inputs.len() > 2048 => Some("'input' must hold 1 to 2048 items".to_owned()),
        Ok(_) if inputs.iter().any(String::is_empty) => Some("'$.input' is invalid: empty string".to_owned()),
        Ok(_) if dimensions == Some(0) => Some("'dimensions' must be at least 1".to_owned()),
        Ok(r) if r.encoding_format.as_deref().is_some_and(|f| f != "float") => {
            Some("this fake only speaks encoding_format=float".to_owned())
        }
        Ok(_) => None,
    };
    let fault = {
        let mut state = shared.state();
        let fault = if authorised && invalid.is_none() { state.faults.pop_front() } else { None };
        state.requests.push(Recorded {
            at: Instant::now(),
            authorization: authorization.clone(),
            model: model.clone(),
            inputs: inputs.clone(),
            dimensions,
            fault: fault.clone(),
        });
        fault
    };
    if !authorised {
        // Like some proxies (OpenAI masks it), the fake echoes the key it got:
        // clients must not pass it on.
        let presented = authorization.as_deref().unwrap_or("").trim_start_matches("Bearer ");
        return error(
            401,
            "invalid_request_error",
            Some("invalid_api_key"),
            &format!("Incorrect API key provided: {presented}."),
        );
    }
    if let Some(message) = invalid {
        return error(400, "invalid_request_error", None, &message);
    }
    let dims = dimensions.unwrap_or(shared.default_dimensions);
    let model = model.unwrap_or_default();
    match fault {
        None => answer(&model, &inputs, dims, |_| {}),
        Some(Fault::Status { code, retry_after }) => {
            let mut response = match code {
                429 => error(code, "requests", Some("rate_limit_exceeded"), "Rate limit reached for requests."),
                500..=599 => {
                    error(code, "server_error", None, "The server had an error while processing your request.")
                }
                _ => error(code, "invalid_request_error", None, "The fake was told to refuse this request."),
            };
            if let Some(seconds) = retry_after {
                response.headers_mut().insert(
                    header::RETRY_AFTER,
                    header::HeaderValue::from_str(&seconds.to_string()).expect("digits are a valid header value"),
                );
            }
            response
        }
        Some(Fault::Delay(delay)) => {
            actix_web::rt::time::sleep(delay).await;
            answer(&model, &inputs, dims, |_| {})
        }
        Some(Fault::Malformed) => {
            HttpResponse::Ok().content_type("application/json").body("this is not JSON {\"object\": \"list\"")
        }
        Some(Fault::WrongShape) => {
            HttpResponse::Ok().json(json!({"object": "list", "data": [{"index": 0, "vector": "nope"}]}))
        }
        Some(Fault::WrongCount) => answer(&model, &inputs, dims, |data| {
            data.pop();
        }),
        Some(Fault::WrongDimensions) => answer(&model, &inputs, dims + 1, |_| {}),
        Some(Fault::Reversed) => answer(&model, &inputs, dims, |data| data.reverse()),
    }
}

/// The real response shape; `tweak` edits `data` before it is sent.
fn answer(model: &str, inputs: &[String], dimensions: usize, tweak: impl FnOnce(&mut Vec<Value>)) -> HttpResponse {
    let embedder = HashEmbedder::new(dimensions);
    let mut data: Vec<Value> = inputs
        .iter()
        .enumerate()
        .map(|(index, text)| json!({"object": "embedding", "index": index, "embedding": embedder.embed_one(text)}))
        .collect();
    tweak(&mut data);
    let tokens: u64 = inputs.iter().map(|t| FakeOpenAi::tokens(t)).sum();
    HttpResponse::Ok().json(json!({
        "object": "list",
        "data": data,
        "model": model,
        "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
    }))
}

/// An OpenAI-style error: `{"error": {"message", "type", "param", "code"}}`.
fn error(status: u16, kind: &str, code: Option<&str>, message: &str) -> HttpResponse {
    let status = actix_web::http::StatusCode::from_u16(status).expect("a fault's status is a valid HTTP status");
    HttpResponse::build(status).json(json!({"error": {"message": message, "type": kind, "param": null, "code": code}}))
}
