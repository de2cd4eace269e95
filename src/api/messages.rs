//! `POST /v1/messages`, `POST /v1/messages/batch`, `GET /v1/messages/{id}`.

use actix_web::{HttpResponse, http::StatusCode, web};
use chrono::Utc;

use super::{ApiError, ApiState, auth::Principal, json, object};
use crate::{
    domain::validate,
    operations::parse_id,
    protocol::{BatchInput, BatchItemResult, BatchResult, MessageInput},
};

#[tracing::instrument(skip_all)]
pub async fn post_message(
    principal: Principal,
    state: web::Data<ApiState>,
    body: web::Json<serde_json::Value>,
) -> Result<HttpResponse, ApiError> {
    principal.may_ingest()?;
    let input: MessageInput = object(body.into_inner(), "message")?;
    let result = state.operations.ingest_one(&principal, input).await?;
    let status = if result.duplicate { StatusCode::OK } else { StatusCode::ACCEPTED };
    Ok(json(status, &result))
}

#[tracing::instrument(skip_all)]
pub async fn post_batch(
    principal: Principal,
    state: web::Data<ApiState>,
    body: web::Json<serde_json::Value>,
) -> Result<HttpResponse, ApiError> {
    principal.may_ingest()?;
    let batch: BatchInput = object(body.into_inner(), "JSON body")?;
    let items = batch.messages;
    let max = state.settings.limits.max_batch;
    if items.is_empty() {
        return Err(ApiError::InvalidRequest("messages must hold at least one message".into()));
    }
    if items.len() > max {
        return Err(ApiError::PayloadTooLarge(format!(
            "a batch holds at most {max} messages; this one has {}",
            items.len()
        )));
    }
    // The request itself was charged once already; each further message
    // counts too.
    state.auth.charge(&principal, items.len() - 1).await?;
    // Each item is validated on its own; the valid ones go in one commit.
    let now = Utc::now();
    let mut results: Vec<Option<BatchItemResult>> = Vec::with_capacity(items.len());
    let mut valid = Vec::new();
    let mut positions = Vec::new();
    for (i, item) in items.into_iter().enumerate() {
        let checked = object(item, "message")
            .and_then(|input| validate::message(input, &state.settings.limits, now).map_err(ApiError::from));
        match checked {
            Ok(message) => {
                valid.push(message);
                positions.push(i);
                results.push(None);
            }
            Err(err) => results.push(Some(BatchItemResult::Err { error: err.body() })),
        }
    }
    if !valid.is_empty() {
        for (i, outcome) in positions.into_iter().zip(state.operations.ingest(&principal, valid).await?) {
            results[i] = Some(BatchItemResult::Ok(outcome.result().clone()));
        }
    }
    let results = results
        .into_iter()
        .map(|r| r.ok_or_else(|| ApiError::Internal("a batch item got no result".into())))
        .collect::<Result<_, _>>()?;
    Ok(json(StatusCode::ACCEPTED, &BatchResult { results }))
}

#[tracing::instrument(skip(principal, state))]
pub async fn get_message(
    principal: Principal,
    state: web::Data<ApiState>,
    path: web::Path<String>,
) -> Result<HttpResponse, ApiError> {
    let id = parse_id(&path, "message")?;
    let message = state.repo.message(id).await.map_err(ApiError::missing("message"))?;
    principal.may_read_message(&message.creator_id)?;
    Ok(json(StatusCode::OK, &message))
}
