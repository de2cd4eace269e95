//! Cluster reads and the creator operations (action, remove, confirm,
//! merge, move), shared by HTTP and WebSocket.

use actix_web::{HttpResponse, http::StatusCode, web};
use serde::Deserialize;
use uuid::Uuid;

use super::{ApiError, ApiState, auth::Principal, json, parse_id};
use crate::{
    domain::validate,
    protocol::{
        self, ActionInput, ActionResult, ClusterView, ConfirmResult, MergeInput, MoveInput, MoveResult, RemoveResult,
    },
    repository::{ClusterFilter, ClusterSort, ListQuery, RepoError, StoredEvent},
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

#[tracing::instrument(skip(principal, state))]
pub async fn list(
    principal: Principal,
    state: web::Data<ApiState>,
    path: web::Path<String>,
    params: web::Query<ListParams>,
) -> Result<HttpResponse, ApiError> {
    let creator_id = path.into_inner();
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
        limit: limit(params.limit, DEFAULT_LIST_LIMIT, MAX_LIST_LIMIT)?,
        cursor: params.cursor,
    };
    Ok(json(StatusCode::OK, &state.repo.list_clusters(&creator_id, query).await?))
}

#[tracing::instrument(skip(principal, state))]
pub async fn detail(
    principal: Principal,
    state: web::Data<ApiState>,
    path: web::Path<String>,
    params: web::Query<PageParams>,
) -> Result<HttpResponse, ApiError> {
    let id = parse_id(&path, "cluster")?;
    authorize_cluster(&state, &principal, id).await?;
    let limit = limit(params.limit, DEFAULT_MESSAGE_LIMIT, MAX_MESSAGE_LIMIT)?;
    let detail = state.repo.cluster_detail(id, limit, params.cursor.as_deref()).await.map_err(missing("cluster"))?;
    Ok(json(StatusCode::OK, &detail))
}

/// Parses a JSON body that must be an object (a derived deserialiser would
/// also take an array as positional fields).
fn body<T: serde::de::DeserializeOwned>(value: serde_json::Value) -> Result<T, ApiError> {
    protocol::from_object(value).map_err(|e| ApiError::InvalidRequest(format!("invalid JSON body: {e}")))
}

/// Refuses unless `principal` may act for the creator of cluster `id`; an
/// unknown cluster is 404 for everyone. A cluster never changes creator, so
/// the answer holds for the transaction that follows.
async fn authorize_cluster(state: &ApiState, principal: &Principal, id: Uuid) -> Result<(), ApiError> {
    if principal.is_admin() {
        return Ok(());
    }
    let owner = state.repo.cluster_owner(id).await.map_err(missing("cluster"))?;
    principal.may_act_for(&owner)
}

/// As [`authorize_cluster`], for the creator of message `id`.
async fn authorize_message(state: &ApiState, principal: &Principal, id: Uuid) -> Result<(), ApiError> {
    if principal.is_admin() {
        return Ok(());
    }
    let owner = state.repo.message_owner(id).await.map_err(missing("message"))?;
    principal.may_act_for(&owner)
}

// The creator operations. The HTTP handlers below and the WebSocket
// session both call these: each validates, runs its one transaction,
// publishes its one event once committed, and returns the answer's body.

/// Answers a cluster's core members (all its members with
/// `include_review`) and closes it.
#[tracing::instrument(skip(state, principal, response_text))]
pub(super) async fn action(
    state: &ApiState,
    principal: &Principal,
    cluster_id: &str,
    response_text: &str,
    include_review: bool,
) -> Result<ActionResult, ApiError> {
    let id = parse_id(cluster_id, "cluster")?;
    authorize_cluster(state, principal, id).await?;
    validate::message_text("response_text", response_text, &state.settings.limits)?;
    let (result, events) =
        state.repo.action_cluster(id, response_text, include_review).await.map_err(missing("cluster"))?;
    publish(state, events);
    Ok(result)
}

/// Splits a message out of its cluster into a new singleton cluster.
#[tracing::instrument(skip(state, principal))]
pub(super) async fn remove(
    state: &ApiState,
    principal: &Principal,
    cluster_id: &str,
    message_id: &str,
) -> Result<RemoveResult, ApiError> {
    let cluster_id = parse_id(cluster_id, "cluster")?;
    let message_id = parse_id(message_id, "message")?;
    authorize_cluster(state, principal, cluster_id).await?;
    let (result, event) =
        state.repo.remove_message(cluster_id, message_id).await.map_err(missing("message in that cluster"))?;
    publish(state, vec![event]);
    Ok(result)
}

/// Confirms a review member: it becomes a core member of its cluster.
#[tracing::instrument(skip(state, principal))]
pub(super) async fn confirm(
    state: &ApiState,
    principal: &Principal,
    cluster_id: &str,
    message_id: &str,
) -> Result<ConfirmResult, ApiError> {
    let cluster_id = parse_id(cluster_id, "cluster")?;
    let message_id = parse_id(message_id, "message")?;
    authorize_cluster(state, principal, cluster_id).await?;
    let (result, event) =
        state.repo.confirm_message(cluster_id, message_id).await.map_err(missing("message in that cluster"))?;
    publish(state, vec![event]);
    Ok(result)
}

/// Merges `cluster_ids` into `cluster_id`.
#[tracing::instrument(skip(state, principal))]
pub(super) async fn merge(
    state: &ApiState,
    principal: &Principal,
    cluster_id: &str,
    cluster_ids: &[String],
) -> Result<ClusterView, ApiError> {
    let target = parse_id(cluster_id, "cluster")?;
    authorize_cluster(state, principal, target).await?;
    validate::merge_sources(cluster_id, cluster_ids)?;
    let sources = cluster_ids
        .iter()
        .map(|id| id.parse().map_err(|_| ApiError::NotFound(format!("cluster {id} not found"))))
        .collect::<Result<Vec<Uuid>, _>>()?;
    let (cluster, event) = state.repo.merge_clusters(target, &sources).await?;
    publish(state, vec![event]);
    Ok(cluster)
}

/// Moves a message into another open cluster.
#[tracing::instrument(skip(state, principal))]
pub(super) async fn move_message(
    state: &ApiState,
    principal: &Principal,
    message_id: &str,
    cluster_id: &str,
) -> Result<MoveResult, ApiError> {
    let message_id = parse_id(message_id, "message")?;
    let cluster_id = parse_id(cluster_id, "cluster")?;
    authorize_message(state, principal, message_id).await?;
    let (result, event) = state.repo.move_message(message_id, cluster_id).await?;
    publish(state, vec![event]);
    Ok(result)
}

/// Hands an operation's committed events to the broadcaster, in order.
fn publish(state: &ApiState, events: Vec<StoredEvent>) {
    state.pipeline.publisher.publish(events);
}

#[tracing::instrument(skip(principal, state, input))]
pub async fn post_action(
    principal: Principal,
    state: web::Data<ApiState>,
    path: web::Path<String>,
    input: web::Json<serde_json::Value>,
) -> Result<HttpResponse, ApiError> {
    let input: ActionInput = body(input.into_inner())?;
    Ok(json(StatusCode::OK, &action(&state, &principal, &path, &input.response_text, input.include_review).await?))
}

#[tracing::instrument(skip(principal, state))]
pub async fn delete_message(
    principal: Principal,
    state: web::Data<ApiState>,
    path: web::Path<(String, String)>,
) -> Result<HttpResponse, ApiError> {
    let (cluster_id, message_id) = path.into_inner();
    Ok(json(StatusCode::OK, &remove(&state, &principal, &cluster_id, &message_id).await?))
}

#[tracing::instrument(skip(principal, state))]
pub async fn post_confirm(
    principal: Principal,
    state: web::Data<ApiState>,
    path: web::Path<(String, String)>,
) -> Result<HttpResponse, ApiError> {
    let (cluster_id, message_id) = path.into_inner();
    Ok(json(StatusCode::OK, &confirm(&state, &principal, &cluster_id, &message_id).await?))
}

#[tracing::instrument(skip(principal, state, input))]
pub async fn post_merge(
    principal: Principal,
    state: web::Data<ApiState>,
    path: web::Path<String>,
    input: web::Json<serde_json::Value>,
) -> Result<HttpResponse, ApiError> {
    let input: MergeInput = body(input.into_inner())?;
    Ok(json(StatusCode::OK, &merge(&state, &principal, &path, &input.cluster_ids).await?))
}

#[tracing::instrument(skip(principal, state, input))]
pub async fn post_move(
    principal: Principal,
    state: web::Data<ApiState>,
    path: web::Path<String>,
    input: web::Json<serde_json::Value>,
) -> Result<HttpResponse, ApiError> {
    let input: MoveInput = body(input.into_inner())?;
    Ok(json(StatusCode::OK, &move_message(&state, &principal, &path, &input.cluster_id).await?))
}
