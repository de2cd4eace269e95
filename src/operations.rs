//! What a caller may ask of clusterd, over any transport: ingest, the
//! creator operations that change a creator's clusters (action, remove,
//! confirm, merge, move) and the operator's retry of failed messages. The
//! HTTP handlers (`api::messages`, `api::clusters`, `api::admin`) and the
//! WebSocket session (`api::ws`) parse their input, call [`Operations`],
//! and serialise its typed answer; neither calls the other.
//!
//! A creator operation validates its input, authorises the caller, runs its
//! one repository transaction, hands the committed events to the
//! [`Publisher`] (the path the clustering shards' decisions take too), and
//! returns its answer. A WebSocket frame names its operation as an
//! [`OperationRequest`], which [`Operations::run`] dispatches.
//!
//! Errors are [`ApiError`], not a type of this module's own: what an
//! operation can report (invalid, forbidden, not found, conflict,
//! unavailable) is exactly what every transport answers, with the same
//! `code` and message over HTTP and in a WebSocket error frame, so a second
//! enum would map one to one onto it. The caller is the
//! [`Principal`] the auth layer resolved from the transport's token; its
//! scope checks already answer in `ApiError`.
//!
//! The two hot reads (a page of a creator's clusters, a cluster's detail)
//! are here too, because they go through the [`QueryCache`]: the caller is
//! authorised first, then the creator's current `last_event_id` is read
//! (one primary-key read), then the cache is asked for the answer at that
//! event. A miss reads the answer, then the `last_event_id` again, and
//! keeps the answer only if it has not moved: every change to a creator's
//! clusters bumps it in the change's own transaction, and each statement
//! sees at least what an earlier one saw, so an unchanged id means the
//! answer's statements saw exactly the state after that event (when it
//! moved, the answer is returned uncached). Their answer is the JSON body
//! itself, byte for byte what was answered when it was cached.
//!
//! A transport that must refuse before it reads a body (HTTP) or queues a
//! frame (WebSocket) checks the caller's scope itself first, so that a
//! caller who may not act learns nothing about the body; the operation
//! checks again, so no transport can forget.

use std::sync::Arc;

use actix::Addr;
use chrono::Utc;
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::{
    actors::{
        Pipeline,
        broadcaster::Publisher,
        embedder::{EmbedItem, EmbedMessages, Embedder},
        ingest::{Ingest, IngestMessages},
    },
    api::{ApiError, auth::Principal},
    domain::validate,
    protocol::{
        ActionResult, ClusterView, ConfirmResult, IngestResult, MessageInput, MoveResult, Operation, RemoveResult,
    },
    query_cache::{QueryCache, Route},
    repository::{ClusterFilter, ClusterSort, InsertOutcome, ListQuery, RepoError, Repository, StoredEvent},
    settings::Limits,
};

/// A creator operation as a client names it (a WebSocket frame's fields;
/// over HTTP, the path and body of its endpoint).
#[derive(Debug, Clone)]
pub enum OperationRequest {
    Action { cluster_id: String, response_text: String, include_review: bool },
    Remove { cluster_id: String, message_id: String },
    Confirm { cluster_id: String, message_id: String },
    Merge { cluster_id: String, cluster_ids: Vec<String> },
    Move { message_id: String, cluster_id: String },
}

impl OperationRequest {
    /// Its name in a WebSocket `result` frame.
    pub fn op(&self) -> Operation {
        match self {
            Self::Action { .. } => Operation::Action,
            Self::Remove { .. } => Operation::Remove,
            Self::Confirm { .. } => Operation::Confirm,
            Self::Merge { .. } => Operation::Merge,
            Self::Move { .. } => Operation::Move,
        }
    }
}

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

/// The operations and what they need; one per application, cheap to clone.
#[derive(Clone)]
pub struct Operations {
    repo: Repository,
    ingest: Addr<Ingest>,
    embedder: Addr<Embedder>,
    publisher: Publisher,
    limits: Limits,
    /// The query cache of the reads; `None`: every read goes to the
    /// database.
    queries: Option<Arc<QueryCache>>,
}

impl Operations {
    pub fn new(repo: Repository, pipeline: &Pipeline, limits: Limits) -> Self {
        Self {
            repo,
            ingest: pipeline.ingest.clone(),
            embedder: pipeline.embedder.clone(),
            publisher: pipeline.publisher.clone(),
            limits,
            queries: None,
        }
    }

    /// Caches the reads in `cache` (unless it is disabled).
    pub fn with_query_cache(mut self, cache: Arc<QueryCache>) -> Self {
        self.queries = Some(cache).filter(|c| c.enabled());
        self
    }

    /// A page of `creator_id`'s clusters, as its JSON body.
    #[tracing::instrument(skip(self, principal))]
    pub async fn list_clusters(
        &self,
        principal: &Principal,
        creator_id: &str,
        query: ListQuery,
    ) -> Result<Arc<str>, ApiError> {
        validate::creator_id(creator_id)?;
        principal.may_act_for(creator_id)?;
        let Some(cache) = &self.queries else {
            return Ok(body_text(&self.repo.list_clusters(creator_id, query).await?));
        };
        let filter = match query.filter {
            ClusterFilter::Open => "open",
            ClusterFilter::Actioned => "actioned",
            ClusterFilter::All => "all",
        };
        let sort = match query.sort {
            ClusterSort::Recent => "recent",
            ClusterSort::Size => "size",
        };
        let (limit, cursor) = (query.limit.to_string(), cursor_part(query.cursor.as_deref()));
        let parts = [filter, sort, limit.as_str(), cursor.as_str()];
        let last = self.repo.last_event_id(creator_id).await?;
        if let Some(body) = cache.get(Route::List, &cache.key(Route::List, creator_id, last, &parts)).await {
            return Ok(body);
        }
        let body = body_text(&self.repo.list_clusters(creator_id, query).await?);
        if self.repo.last_event_id(creator_id).await? == last {
            cache.put(cache.key(Route::List, creator_id, last, &parts), body.clone()).await;
        }
        Ok(body)
    }

    /// Cluster `cluster_id` with a page of its messages, as its JSON body.
    /// An unknown cluster is 404 for everyone, another creator's 403.
    #[tracing::instrument(skip(self, principal))]
    pub async fn cluster_detail(
        &self,
        principal: &Principal,
        cluster_id: &str,
        limit: Option<u32>,
        cursor: Option<&str>,
    ) -> Result<Arc<str>, ApiError> {
        let id = parse_id(cluster_id, "cluster")?;
        let Some(cache) = &self.queries else {
            self.authorize_cluster(principal, id).await?;
            let limit = page_limit(limit, DEFAULT_MESSAGE_LIMIT, MAX_MESSAGE_LIMIT)?;
            let detail = self.repo.cluster_detail(id, limit, cursor).await.map_err(ApiError::missing("cluster"))?;
            return Ok(body_text(&detail));
        };
        // A cluster never changes creator: its owner is the creator whose
        // events key it.
        let (owner, last) = self.repo.cluster_generation(id).await.map_err(ApiError::missing("cluster"))?;
        principal.may_act_for(&owner)?;
        let limit = page_limit(limit, DEFAULT_MESSAGE_LIMIT, MAX_MESSAGE_LIMIT)?;
        let (id_part, limit_part, cursor_part) = (id.to_string(), limit.to_string(), cursor_part(cursor));
        let parts = [id_part.as_str(), limit_part.as_str(), cursor_part.as_str()];
        if let Some(body) = cache.get(Route::Detail, &cache.key(Route::Detail, &owner, last, &parts)).await {
            return Ok(body);
        }
        let detail = self.repo.cluster_detail(id, limit, cursor).await.map_err(ApiError::missing("cluster"))?;
        let body = body_text(&detail);
        if self.repo.last_event_id(&owner).await? == last {
            cache.put(cache.key(Route::Detail, &owner, last, &parts), body.clone()).await;
        }
        Ok(body)
    }

    /// Runs the creator operation `request` names; its answer is the body
    /// its HTTP endpoint answers with 200.
    pub async fn run(&self, principal: &Principal, request: OperationRequest) -> Result<serde_json::Value, ApiError> {
        fn body(answer: impl Serialize) -> serde_json::Value {
            serde_json::to_value(answer).expect("operation answers serialise")
        }
        Ok(match request {
            OperationRequest::Action { cluster_id, response_text, include_review } => {
                body(self.action(principal, &cluster_id, &response_text, include_review).await?)
            }
            OperationRequest::Remove { cluster_id, message_id } => {
                body(self.remove(principal, &cluster_id, &message_id).await?)
            }
            OperationRequest::Confirm { cluster_id, message_id } => {
                body(self.confirm(principal, &cluster_id, &message_id).await?)
            }
            OperationRequest::Merge { cluster_id, cluster_ids } => {
                body(self.merge(principal, &cluster_id, &cluster_ids).await?)
            }
            OperationRequest::Move { message_id, cluster_id } => {
                body(self.move_message(principal, &message_id, &cluster_id).await?)
            }
        })
    }

    /// Durably stores validated messages, in one commit with whatever else
    /// the ingest actor has queued.
    pub async fn ingest(
        &self,
        principal: &Principal,
        messages: Vec<validate::NewMessage>,
    ) -> Result<Vec<InsertOutcome>, ApiError> {
        principal.may_ingest()?;
        let outcomes = self
            .ingest
            .send(IngestMessages { messages })
            .await
            .map_err(|_| ApiError::Unavailable("ingest is restarting; retry later".into()))??;
        Ok(outcomes)
    }

    /// Validates and stores one message; the result and whether it was a
    /// duplicate.
    pub async fn ingest_one(&self, principal: &Principal, input: MessageInput) -> Result<IngestResult, ApiError> {
        let message = validate::message(input, &self.limits, Utc::now())?;
        let outcome = self
            .ingest(principal, vec![message])
            .await?
            .pop()
            .ok_or_else(|| ApiError::Internal("ingest returned no outcome".into()))?;
        Ok(outcome.result().clone())
    }

    /// Answers a cluster's core members (all its members with
    /// `include_review`) and closes it.
    #[tracing::instrument(skip(self, principal, response_text))]
    pub async fn action(
        &self,
        principal: &Principal,
        cluster_id: &str,
        response_text: &str,
        include_review: bool,
    ) -> Result<ActionResult, ApiError> {
        let id = parse_id(cluster_id, "cluster")?;
        self.authorize_cluster(principal, id).await?;
        validate::message_text("response_text", response_text, &self.limits)?;
        let (result, events) =
            self.repo.action_cluster(id, response_text, include_review).await.map_err(ApiError::missing("cluster"))?;
        self.publisher.publish(events);
        Ok(result)
    }

    /// Splits a message out of its cluster into a new singleton cluster.
    #[tracing::instrument(skip(self, principal))]
    pub async fn remove(
        &self,
        principal: &Principal,
        cluster_id: &str,
        message_id: &str,
    ) -> Result<RemoveResult, ApiError> {
        self.change_member(principal, cluster_id, message_id, async |c, m| self.repo.remove_message(c, m).await).await
    }

    /// Confirms a review member: it becomes a core member of its cluster.
    #[tracing::instrument(skip(self, principal))]
    pub async fn confirm(
        &self,
        principal: &Principal,
        cluster_id: &str,
        message_id: &str,
    ) -> Result<ConfirmResult, ApiError> {
        self.change_member(principal, cluster_id, message_id, async |c, m| self.repo.confirm_message(c, m).await).await
    }

    /// Runs `change` on member `message_id` of cluster `cluster_id` once the
    /// caller may act on that cluster, and publishes its event.
    async fn change_member<T>(
        &self,
        principal: &Principal,
        cluster_id: &str,
        message_id: &str,
        change: impl AsyncFnOnce(Uuid, Uuid) -> Result<(T, StoredEvent), RepoError>,
    ) -> Result<T, ApiError> {
        let cluster_id = parse_id(cluster_id, "cluster")?;
        let message_id = parse_id(message_id, "message")?;
        self.authorize_cluster(principal, cluster_id).await?;
        let (result, event) =
            change(cluster_id, message_id).await.map_err(ApiError::missing("message in that cluster"))?;
        self.publisher.publish(vec![event]);
        Ok(result)
    }

    /// Merges `cluster_ids` into `cluster_id`.
    #[tracing::instrument(skip(self, principal))]
    pub async fn merge(
        &self,
        principal: &Principal,
        cluster_id: &str,
        cluster_ids: &[String],
    ) -> Result<ClusterView, ApiError> {
        let target = parse_id(cluster_id, "cluster")?;
        self.authorize_cluster(principal, target).await?;
        validate::merge_sources(cluster_id, cluster_ids)?;
        let sources = cluster_ids
            .iter()
            .map(|id| id.parse().map_err(|_| ApiError::not_found(&format!("cluster {id}"))))
            .collect::<Result<Vec<Uuid>, _>>()?;
        let (cluster, event) = self.repo.merge_clusters(target, &sources).await?;
        self.publisher.publish(vec![event]);
        Ok(cluster)
    }

    /// Moves a message into another open cluster.
    #[tracing::instrument(skip(self, principal))]
    pub async fn move_message(
        &self,
        principal: &Principal,
        message_id: &str,
        cluster_id: &str,
    ) -> Result<MoveResult, ApiError> {
        let message_id = parse_id(message_id, "message")?;
        let cluster_id = parse_id(cluster_id, "cluster")?;
        self.authorize_message(principal, message_id).await?;
        let (result, event) = self.repo.move_message(message_id, cluster_id).await?;
        self.publisher.publish(vec![event]);
        Ok(result)
    }

    /// Puts `failed` messages back into the pipeline (e.g. once an
    /// embedding provider that kept failing is back).
    #[tracing::instrument(skip_all)]
    pub async fn retry_failed(&self, principal: &Principal, input: RetryInput) -> Result<RetryResult, ApiError> {
        principal.require_admin()?;
        if let Some(creator_id) = &input.creator_id {
            validate::creator_id(creator_id)?;
        }
        let ids = input.message_ids.as_deref();
        if ids.is_some_and(|ids| ids.len() > self.limits.max_batch) {
            return Err(ApiError::PayloadTooLarge(format!(
                "at most {} message_ids per request",
                self.limits.max_batch
            )));
        }
        let messages = self.repo.retry_failed(input.creator_id.as_deref(), ids).await?;
        let retried = messages.len();
        if retried > 0 {
            let items =
                messages.into_iter().map(|m| EmbedItem { id: m.id, creator_id: m.creator_id, text: m.text }).collect();
            // Were the embedder's queue full, the messages stay `pending` and
            // the recovery sweep picks them up: nothing is lost either way.
            self.embedder.do_send(EmbedMessages { items });
        }
        tracing::info!(retried, "failed messages put back into the pipeline");
        Ok(RetryResult { retried })
    }

    /// Refuses unless `principal` may act for the creator of cluster `id`;
    /// an unknown cluster is 404 for everyone. A cluster never changes
    /// creator, so the answer holds for the transaction that follows.
    pub async fn authorize_cluster(&self, principal: &Principal, id: Uuid) -> Result<(), ApiError> {
        if principal.is_admin() {
            return Ok(());
        }
        let owner = self.repo.cluster_owner(id).await.map_err(ApiError::missing("cluster"))?;
        principal.may_act_for(&owner)
    }

    /// As [`Self::authorize_cluster`], for the creator of message `id`.
    async fn authorize_message(&self, principal: &Principal, id: Uuid) -> Result<(), ApiError> {
        if principal.is_admin() {
            return Ok(());
        }
        let owner = self.repo.message_owner(id).await.map_err(ApiError::missing("message"))?;
        principal.may_act_for(&owner)
    }
}

/// Messages in a page of a cluster's detail: by default, and at most.
const DEFAULT_MESSAGE_LIMIT: u32 = 50;
const MAX_MESSAGE_LIMIT: u32 = 500;

/// The size of a page a client asked for (`requested`), within 1..=`max`.
pub fn page_limit(requested: Option<u32>, default: u32, max: u32) -> Result<u32, ApiError> {
    match requested {
        None => Ok(default),
        Some(n) if (1..=max).contains(&n) => Ok(n),
        Some(_) => Err(ApiError::InvalidRequest(format!("limit must be between 1 and {max}"))),
    }
}

/// A read's answer as the JSON text of its body.
fn body_text(answer: &impl Serialize) -> Arc<str> {
    serde_json::to_string(answer).expect("read answers serialise").into()
}

/// A page cursor as a key part: absent and empty are different requests.
fn cursor_part(cursor: Option<&str>) -> String {
    match cursor {
        None => "-".to_owned(),
        Some(c) => format!("c{c}"),
    }
}

/// Parses an id a client sent; anything that is not an id names nothing,
/// so it is a 404 like an unknown id.
pub fn parse_id(raw: &str, what: &str) -> Result<Uuid, ApiError> {
    raw.parse().map_err(|_| ApiError::not_found(what))
}
