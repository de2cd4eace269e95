//! Operator endpoints under `/v1/admin`.

use actix_web::{HttpResponse, http::StatusCode, web};

use super::{ApiError, ApiState, auth::Principal, json, object};
use crate::operations::RetryInput;

/// `POST /v1/admin/messages/retry`: puts `failed` messages back into the
/// pipeline.
#[tracing::instrument(skip_all)]
pub async fn retry_failed(
    principal: Principal,
    state: web::Data<ApiState>,
    body: web::Json<serde_json::Value>,
) -> Result<HttpResponse, ApiError> {
    // Before the body: only an operator learns what a valid one looks like.
    principal.require_admin()?;
    let input: RetryInput = object(body.into_inner(), "retry request")?;
    Ok(json(StatusCode::OK, &state.operations.retry_failed(&principal, input).await?))
}
