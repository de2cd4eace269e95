//! The HTTP and WebSocket API: thin handlers that parse, call the
//! [`Operations`] or a repository read, and map results to the contract's
//! shapes.

mod admin;
pub mod auth;
mod clusters;
pub mod error;
mod health;
mod messages;
pub mod shared_rate;
mod ws;

use std::sync::{
    Arc,
    atomic::{AtomicU64, AtomicUsize},
};

use actix_web::{
    HttpResponse,
    body::MessageBody,
    dev::{ServiceRequest, ServiceResponse},
    middleware::Next,
    web,
};
use tokio::sync::watch;

use crate::{actors::Pipeline, metrics::Metrics, operations::Operations, repository::Repository, settings::Settings};

pub use error::ApiError;

/// What every handler may use; one per application.
pub struct ApiState {
    pub repo: Repository,
    pub pipeline: Pipeline,
    /// What both transports ask of clusterd: ingest and the operations.
    pub operations: Operations,
    pub settings: Settings,
    pub metrics: Arc<Metrics>,
    pub auth: auth::Authenticator,
    /// Source of WebSocket session ids.
    pub next_session: AtomicU64,
    /// Open WebSocket sessions, held under `ws.max_connections`.
    pub ws_sessions: AtomicUsize,
    /// Turns true when the server begins to shut down: sessions close
    /// with 1001 and new upgrades are refused.
    pub shutdown: watch::Receiver<bool>,
}

/// Registers every route on an actix-web `App`.
pub fn configure(cfg: &mut web::ServiceConfig, state: web::Data<ApiState>) {
    let max_body = state.settings.limits.max_body_bytes;
    cfg.app_data(state)
        .app_data(web::JsonConfig::default().limit(max_body).error_handler(error::json_error))
        .app_data(web::PayloadConfig::default().limit(max_body))
        .app_data(web::QueryConfig::default().error_handler(error::query_error))
        .app_data(web::PathConfig::default().error_handler(error::path_error))
        .route("/healthz", web::get().to(health::healthz))
        .route("/readyz", web::get().to(health::readyz))
        .route("/metrics", web::get().to(health::metrics))
        .service(
            web::scope("/v1")
                .route("/messages", web::post().to(messages::post_message))
                .route("/messages/batch", web::post().to(messages::post_batch))
                .route("/messages/{id}", web::get().to(messages::get_message))
                .route("/messages/{id}/move", web::post().to(clusters::post_move))
                .route("/creators/{creator_id}/clusters", web::get().to(clusters::list))
                .route("/clusters/{id}", web::get().to(clusters::detail))
                .route("/clusters/{id}/action", web::post().to(clusters::post_action))
                .route("/clusters/{id}/merge", web::post().to(clusters::post_merge))
                .route("/clusters/{id}/messages/{message_id}", web::delete().to(clusters::delete_message))
                .route("/clusters/{id}/messages/{message_id}/confirm", web::post().to(clusters::post_confirm))
                .route("/ws", web::get().to(ws::connect))
                .route("/admin/messages/retry", web::post().to(admin::retry_failed)),
        )
        .default_service(web::to(|| async { Err::<HttpResponse, _>(ApiError::not_found("route")) }));
}

/// Counts and times every request by route pattern and status.
pub async fn track(
    req: ServiceRequest,
    next: Next<impl MessageBody + 'static>,
) -> Result<ServiceResponse<impl MessageBody>, actix_web::Error> {
    let metrics = req.app_data::<web::Data<ApiState>>().map(|s| s.metrics.clone());
    let route = req.match_pattern().unwrap_or_else(|| "unmatched".into());
    let started = std::time::Instant::now();
    let _in_flight = metrics.as_ref().map(|m| InFlight::new(&m.http_in_flight));
    let response = next.call(req).await;
    if let Some(metrics) = metrics {
        let status = match &response {
            Ok(response) => response.status(),
            Err(error) => error.as_response_error().status_code(),
        };
        metrics.http_seconds.with_label_values(&[&route]).observe(started.elapsed().as_secs_f64());
        metrics.http_requests.with_label_values(&[route.as_str(), status.as_str()]).inc();
    }
    response
}

/// Counts a request in flight until dropped (also when the request is).
struct InFlight(prometheus::IntGauge);

impl InFlight {
    fn new(gauge: &prometheus::IntGauge) -> Self {
        gauge.inc();
        Self(gauge.clone())
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.dec();
    }
}

/// Answers 503 `unavailable` (with Retry-After) when a request, reading its
/// body included, takes longer than `server.request_timeout_ms`. Dropping
/// the handler does not undo what it already committed: an ingest may be
/// stored, and its retry with the same external_id answers duplicate.
pub async fn time_limit(
    req: ServiceRequest,
    next: Next<impl MessageBody + 'static>,
) -> Result<ServiceResponse<impl MessageBody>, actix_web::Error> {
    let Some(limit) = req.app_data::<web::Data<ApiState>>().map(|s| s.settings.server.request_timeout()) else {
        return next.call(req).await;
    };
    // Not the request itself: routing needs it unshared.
    let path = req.path().to_owned();
    match tokio::time::timeout(limit, next.call(req)).await {
        Ok(response) => response,
        Err(_elapsed) => {
            tracing::warn!(path, limit_ms = limit.as_millis(), "request timed out");
            Err(ApiError::Unavailable(format!(
                "the request took longer than {} ms; retry (an ingest retried with the same external_id answers \
                 duplicate if it was stored)",
                limit.as_millis()
            ))
            .into())
        }
    }
}

/// Parses a JSON body that must be an object (a derived deserialiser would
/// also take an array as positional fields); `what` names it in the error.
fn object<T: serde::de::DeserializeOwned>(value: serde_json::Value, what: &str) -> Result<T, ApiError> {
    crate::protocol::from_object(value).map_err(|e| ApiError::InvalidRequest(format!("invalid {what}: {e}")))
}

fn json<T: serde::Serialize>(status: actix_web::http::StatusCode, body: &T) -> HttpResponse {
    HttpResponse::build(status).json(body)
}
