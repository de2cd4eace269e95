//! Operator endpoints under `/v1/admin`.

use actix_web::{HttpResponse, http::StatusCode, web};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use super::{ApiError, ApiState, auth::Principal, json};
use crate::{
    actors::embedder::{EmbedItem, EmbedMessages},
    domain::validate,
};

/// Which failed messages to retry; no field: every failed message.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RetryInput {
    pub creator_id: Option<String>,
    pub message_ids: Option<Vec<Uuid>>,
}

#[derive(Debug, Serialize)]
pub struct RetryResult {
    /// Messages put back to `pending` and handed to the embedder.
    pub retried: usize,
}

/// `POST /v1/admin/messages/retry`: puts `failed` messages back into the
/// pipeline (e.g. once an embedding provider that kept failing is back).
#[tracing::instrument(skip_all)]
pub async fn retry_failed(
    principal: Principal,
    state: web::Data<ApiState>,
    body: web::Json<serde_json::Value>,
) -> Result<HttpResponse, ApiError> {
    principal.require_admin()?;
    let input: RetryInput = crate::protocol::from_object(body.into_inner())
        .map_err(|e| ApiError::InvalidRequest(format!("invalid retry request: {e}")))?;
    if let Some(creator_id) = &input.creator_id {
        validate::creator_id(creator_id)?;
    }
    let ids = input.message_ids.as_deref();
    if ids.is_some_and(|ids| ids.len() > state.settings.limits.max_batch) {
        return Err(ApiError::PayloadTooLarge(format!(
            "at most {} message_ids per request",
            state.settings.limits.max_batch
        )));
    }
    let messages = state.repo.retry_failed(input.creator_id.as_deref(), ids).await?;
    let retried = messages.len();
    if retried > 0 {
        let items =
            messages.into_iter().map(|m| EmbedItem { id: m.id, creator_id: m.creator_id, text: m.text }).collect();
        // Were the embedder's queue full, the messages stay `pending` and the
        // recovery sweep picks them up: nothing is lost either way.
        state.pipeline.embedder.do_send(EmbedMessages { items });
    }
    tracing::info!(retried, "failed messages put back into the pipeline");
    Ok(json(StatusCode::OK, &RetryResult { retried }))
}
