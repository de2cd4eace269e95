//! Cluster reads and creator operations.

use actix_web::{HttpResponse, http::StatusCode, web};
use serde::Deserialize;

use super::{ApiError, ApiState, json, parse_id};
use crate::{
    actors::broadcaster::Publish,
    domain::validate,
    protocol::ActionInput,
    repository::{ClusterFilter, ClusterSort, ListQuery, RepoError},
};

const DEFAULT_LIST_LIMIT: u32 = 20;
const MAX_LIST_LIMIT: u32 = 100;
const DEFAULT_MESSAGE_LIMIT: u32 = 50;
const MAX_MESSAGE_LIMIT: u32 = 500;

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

fn limit(requested: Option<u32>, default: u32, max: u32) -> Result<u32, ApiError> {
    match requested {
        None => Ok(default),
        Some(n) if (1..=max).contains(&n) => Ok(n),
        Some(_) => Err(ApiError::InvalidRequest(format!("limit must be between 1 and {max}"))),
    }
}

/// Maps "not found" to the kind of thing that was looked for.
fn missing(what: &'static str) -> impl Fn(RepoError) -> ApiError {
    move |e| match e {
        RepoError::NotFound => ApiError::not_found(what),
        other => other.into(),
    }
}

#[tracing::instrument(skip(state))]
pub async fn list(
    state: web::Data<ApiState>,
    path: web::Path<String>,
    params: web::Query<ListParams>,
) -> Result<HttpResponse, ApiError> {
    let creator_id = path.into_inner();
    validate::creator_id(&creator_id)?;
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
        limit: limit(params.limit, DEFAULT_LIST_LIMIT, MAX_LIST_LIMIT)?,
        cursor: params.cursor,
    };
    Ok(json(StatusCode::OK, &state.repo.list_clusters(&creator_id, query).await?))
}

#[tracing::instrument(skip(state))]
pub async fn detail(
    state: web::Data<ApiState>,
    path: web::Path<String>,
    params: web::Query<PageParams>,
) -> Result<HttpResponse, ApiError> {
    let id = parse_id(&path, "cluster")?;
    let limit = limit(params.limit, DEFAULT_MESSAGE_LIMIT, MAX_MESSAGE_LIMIT)?;
    let detail = state.repo.cluster_detail(id, limit, params.cursor.as_deref()).await.map_err(missing("cluster"))?;
    Ok(json(StatusCode::OK, &detail))
}

#[tracing::instrument(skip(state, body))]
pub async fn action(
    state: web::Data<ApiState>,
    path: web::Path<String>,
    body: web::Json<ActionInput>,
) -> Result<HttpResponse, ApiError> {
    let id = parse_id(&path, "cluster")?;
    validate::message_text("response_text", &body.response_text, &state.settings.limits)?;
    let (cluster, event) = state.repo.action_cluster(id, &body.response_text).await.map_err(missing("cluster"))?;
    state.pipeline.broadcaster.do_send(Publish { events: vec![event] });
    Ok(json(StatusCode::OK, &cluster))
}

#[tracing::instrument(skip(state))]
pub async fn remove_message(
    state: web::Data<ApiState>,
    path: web::Path<(String, String)>,
) -> Result<HttpResponse, ApiError> {
    let (cluster_id, message_id) = path.into_inner();
    let cluster_id = parse_id(&cluster_id, "cluster")?;
    let message_id = parse_id(&message_id, "message")?;
    let (result, event) =
        state.repo.remove_message(cluster_id, message_id).await.map_err(missing("message in that cluster"))?;
    state.pipeline.broadcaster.do_send(Publish { events: vec![event] });
    Ok(json(StatusCode::OK, &result))
}
