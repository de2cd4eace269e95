//! Cluster reads (a page of a creator's clusters, a cluster's detail),
//! which parse their parameters and answer the body [`crate::operations`]
//! gives (from the query cache or the database), and the HTTP endpoints of
//! the creator operations (action, remove, confirm, merge, move), which
//! parse the path and body, call [`crate::operations`] and serialise its
//! answer.

use actix_web::{
    HttpResponse,
    http::{StatusCode, header::ContentType},
    web,
};
use serde::Deserialize;

use super::{ApiError, ApiState, auth::Principal, json, object};
use crate::{
    domain::validate,
    operations::page_limit,
    protocol::{ActionInput, MergeInput, MoveInput},
    repository::{ClusterFilter, ClusterSort, ListQuery},
};

const DEFAULT_LIST_LIMIT: u32 = 20;
const MAX_LIST_LIMIT: u32 = 100;

#[derive(Debug, Deserialize)]
pub struct ListParams {
    status: Option<String>,
    sort: Option<String>,
    limit: Option<u32>,
    cursor: Option<String>,
}

#[derive(Debug, Deserialize)]
pub struct PageParams {
    limit: Option<u32>,
    cursor: Option<String>,
}

#[tracing::instrument(skip(principal, state))]
pub async fn list(
    principal: Principal,
    state: web::Data<ApiState>,
    path: web::Path<String>,
    params: web::Query<ListParams>,
) -> Result<HttpResponse, ApiError> {
    let creator_id = path.into_inner();
    // Refused before the parameters are looked at (the operation checks
    // again).
    validate::creator_id(&creator_id)?;
    principal.may_act_for(&creator_id)?;
    let params = params.into_inner();
    let filter = match params.status.as_deref() {
        None | Some("open") => ClusterFilter::Open,
        Some("actioned") => ClusterFilter::Actioned,
        Some("all") => ClusterFilter::All,
        Some(other) => {
            return Err(ApiError::InvalidRequest(format!("status must be open, actioned or all, not {other:?}")));
        }
    };
    let sort = match params.sort.as_deref() {
        None | Some("recent") => ClusterSort::Recent,
        Some("size") => ClusterSort::Size,
        Some(other) => return Err(ApiError::InvalidRequest(format!("sort must be recent or size, not {other:?}"))),
    };
    let query = ListQuery {
        filter,
        sort,
        limit: page_limit(params.limit, DEFAULT_LIST_LIMIT, MAX_LIST_LIMIT)?,
        cursor: params.cursor,
    };
    Ok(cached_json(state.operations.list_clusters(&principal, &creator_id, query).await?))
}

#[tracing::instrument(skip(principal, state))]
pub async fn detail(
    principal: Principal,
    state: web::Data<ApiState>,
    path: web::Path<String>,
    params: web::Query<PageParams>,
) -> Result<HttpResponse, ApiError> {
    Ok(cached_json(state.operations.cluster_detail(&principal, &path, params.limit, params.cursor.as_deref()).await?))
}

/// A 200 with a read's JSON body as the operation gave it (maybe cached).
fn cached_json(body: std::sync::Arc<str>) -> HttpResponse {
    HttpResponse::Ok().content_type(ContentType::json()).body(body.to_string())
}

#[tracing::instrument(skip(principal, state, input))]
pub async fn post_action(
    principal: Principal,
    state: web::Data<ApiState>,
    path: web::Path<String>,
    input: web::Json<serde_json::Value>,
) -> Result<HttpResponse, ApiError> {
    let input: ActionInput = object(input.into_inner(), "JSON body")?;
    let result = state.operations.action(&principal, &path, &input.response_text, input.include_review).await?;
    Ok(json(StatusCode::OK, &result))
}

#[tracing::instrument(skip(principal, state))]
pub async fn delete_message(
    principal: Principal,
    state: web::Data<ApiState>,
    path: web::Path<(String, String)>,
) -> Result<HttpResponse, ApiError> {
    let (cluster_id, message_id) = path.into_inner();
    Ok(json(StatusCode::OK, &state.operations.remove(&principal, &cluster_id, &message_id).await?))
}

#[tracing::instrument(skip(principal, state))]
pub async fn post_confirm(
    principal: Principal,
    state: web::Data<ApiState>,
    path: web::Path<(String, String)>,
) -> Result<HttpResponse, ApiError> {
    let (cluster_id, message_id) = path.into_inner();
    Ok(json(StatusCode::OK, &state.operations.confirm(&principal, &cluster_id, &message_id).await?))
}

#[tracing::instrument(skip(principal, state, input))]
pub async fn post_merge(
    principal: Principal,
    state: web::Data<ApiState>,
    path: web::Path<String>,
    input: web::Json<serde_json::Value>,
) -> Result<HttpResponse, ApiError> {
    let input: MergeInput = object(input.into_inner(), "JSON body")?;
    Ok(json(StatusCode::OK, &state.operations.merge(&principal, &path, &input.cluster_ids).await?))
}

#[tracing::instrument(skip(principal, state, input))]
pub async fn post_move(
    principal: Principal,
    state: web::Data<ApiState>,
    path: web::Path<String>,
    input: web::Json<serde_json::Value>,
) -> Result<HttpResponse, ApiError> {
    let input: MoveInput = object(input.into_inner(), "JSON body")?;
    Ok(json(StatusCode::OK, &state.operations.move_message(&principal, &path, &input.cluster_id).await?))
}
