//! Liveness, readiness and metrics.

use actix_web::{HttpResponse, web};

use super::{ApiError, ApiState, auth::Principal};

/// Alive as long as the process answers.
pub async fn healthz() -> HttpResponse {
    HttpResponse::Ok().json(serde_json::json!({"status": "ok"}))
}

/// Ready when the database answers.
pub async fn readyz(state: web::Data<ApiState>) -> Result<HttpResponse, ApiError> {
    state.repo.ping().await.map_err(|_| ApiError::Unavailable("the database is unavailable".into()))?;
    Ok(HttpResponse::Ok().json(serde_json::json!({"status": "ready"})))
}

/// Prometheus text; for admin tokens (scrapers send one as a bearer token).
pub async fn metrics(principal: Principal, state: web::Data<ApiState>) -> Result<HttpResponse, ApiError> {
    principal.require_admin()?;
    Ok(HttpResponse::Ok().content_type("text/plain; version=0.0.4; charset=utf-8").body(state.metrics.render()))
}
