//! The wire types of the HTTP and WebSocket API: what clients send and what
//! they get back. Shared with `loadtest` so both sides agree by construction.

use chrono::{DateTime, Utc};
use sea_orm::DeriveValueType;
use serde::{Deserialize, Serialize};
use strum::{Display, EnumString, IntoStaticStr};
use uuid::Uuid;

/// Deserialises `T` from a JSON object only. Derived struct
/// deserialisers also accept arrays (`["c1", "hi"]` as a positional
/// message), which the API must refuse.
pub fn from_object<T: serde::de::DeserializeOwned>(value: serde_json::Value) -> Result<T, serde_json::Error> {
    if !value.is_object() {
        return Err(serde::de::Error::custom(format!("expected a JSON object, got {}", kind(&value))));
    }
    serde_json::from_value(value)
}

fn kind(value: &serde_json::Value) -> &'static str {
    match value {
        serde_json::Value::Null => "null",
        serde_json::Value::Bool(_) => "a boolean",
        serde_json::Value::Number(_) => "a number",
        serde_json::Value::String(_) => "a string",
        serde_json::Value::Array(_) => "an array",
        serde_json::Value::Object(_) => "an object",
    }
}

/// `deserialize_with` form of [`from_object`].
fn object<'de, D, T>(deserializer: D) -> Result<T, D::Error>
where
    D: serde::Deserializer<'de>,
    T: serde::de::DeserializeOwned,
{
    let value = serde_json::Value::deserialize(deserializer)?;
    from_object(value).map_err(serde::de::Error::custom)
}

/// `deserialize_with` form of [`from_object`] for an optional field: `null`
/// is `None`.
fn optional_object<'de, D, T>(deserializer: D) -> Result<Option<T>, D::Error>
where
    D: serde::Deserializer<'de>,
    T: serde::de::DeserializeOwned,
{
    let value = Option::<serde_json::Value>::deserialize(deserializer)?;
    value.map(|v| from_object(v).map_err(serde::de::Error::custom)).transpose()
}

/// A message as a client submits it (`POST /v1/messages`, WebSocket `ingest`).
/// Unknown fields are rejected so that a typo (`extrnal_id`) cannot silently
/// disable idempotency.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MessageInput {
    pub creator_id: String,
    pub text: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub external_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none", deserialize_with = "optional_object")]
    pub visitor: Option<Visitor>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub raw_payload: Option<serde_json::Value>,
    /// RFC 3339; the receive time when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sent_at: Option<String>,
}

/// Who sent a message, as the integration knows them.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Visitor {
    #[serde(default)]
    pub id: Option<String>,
    #[serde(default)]
    pub name: Option<String>,
    #[serde(default)]
    pub avatar_url: Option<String>,
}

/// `POST /v1/messages/batch`. Items stay raw JSON so that each one is
/// validated, and answered, on its own.
#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct BatchInput {
    pub messages: Vec<serde_json::Value>,
}

/// Where a message is in the pipeline; stored as this text in
/// `messages.status`.
///
/// The stored states derive their text twice, for serde (the API) and for
/// strum (the database, through sea-orm's `DeriveValueType`, which reads
/// with `crate::repository::stored`: an unknown text is an error, never a
/// default); a unit test holds the two to each other.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Display, EnumString, DeriveValueType)]
#[serde(rename_all = "lowercase")]
#[strum(serialize_all = "lowercase")]
#[sea_orm(value_type = "String", from_str = "crate::repository::stored")]
pub enum MessageStatus {
    Pending,
    Embedded,
    Clustered,
    Failed,
}

/// The answer to one ingested message.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct IngestResult {
    pub message_id: Uuid,
    pub status: MessageStatus,
    pub cluster_id: Option<Uuid>,
    pub duplicate: bool,
}

/// `POST /v1/messages/batch` answer: one entry per submitted item, in order.
#[derive(Debug, Serialize, Deserialize)]
pub struct BatchResult {
    pub results: Vec<BatchItemResult>,
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(untagged)]
pub enum BatchItemResult {
    Ok(IngestResult),
    Err { error: ErrorBody },
}

/// How a clustered message belongs to its cluster (SPEC, "Precision
/// first"): a reply to the cluster answers its `core` members; a `review`
/// member joined on weaker evidence and waits for the creator to confirm
/// or remove it.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, Display, EnumString, IntoStaticStr, DeriveValueType,
)]
#[serde(rename_all = "lowercase")]
#[strum(serialize_all = "lowercase")]
#[sea_orm(value_type = "String", from_str = "crate::repository::stored")]
pub enum Membership {
    Core,
    Review,
}

/// A stored message as the API shows it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MessageView {
    pub id: Uuid,
    pub creator_id: String,
    pub external_id: Option<String>,
    pub text: String,
    pub visitor: Option<Visitor>,
    pub status: MessageStatus,
    pub cluster_id: Option<Uuid>,
    /// How it belongs to its cluster; null until clustered.
    #[serde(default)]
    pub membership: Option<Membership>,
    /// Its average cosine similarity to the cluster's core members when it
    /// was placed (1 for the message that opened the cluster); null until
    /// clustered. Written with six decimals, the same in every answer and
    /// event.
    #[serde(default, serialize_with = "six_decimals")]
    pub similarity: Option<f32>,
    pub sent_at: DateTime<Utc>,
    pub received_at: DateTime<Utc>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// An `f32` as JSON with six decimals: written straight to text or through
/// `serde_json::Value` (as stored events are), it reads the same.
fn six_decimals<S: serde::Serializer>(value: &Option<f32>, serializer: S) -> Result<S::Ok, S::Error> {
    match value {
        Some(v) => serializer.serialize_f64((f64::from(*v) * 1e6).round() / 1e6),
        None => serializer.serialize_none(),
    }
}

/// Whether a cluster still gathers messages; stored as this text in
/// `clusters.status`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Display, EnumString, DeriveValueType)]
#[serde(rename_all = "lowercase")]
#[strum(serialize_all = "lowercase")]
#[sea_orm(value_type = "String", from_str = "crate::repository::stored")]
pub enum ClusterStatus {
    Open,
    Actioned,
}

/// A cluster as the API shows it. `sample_messages` is filled in listings
/// only (absent from events and detail).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ClusterView {
    pub id: Uuid,
    pub creator_id: String,
    pub status: ClusterStatus,
    /// Members, core and review.
    pub size: i32,
    /// Members a reply answers.
    #[serde(default)]
    pub core_size: i32,
    pub label: String,
    pub response_text: Option<String>,
    pub suggested_response: Option<String>,
    pub actioned_at: Option<DateTime<Utc>>,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sample_messages: Option<Vec<MessageView>>,
}

/// `GET /v1/creators/{creator_id}/clusters`.
#[derive(Debug, Serialize, Deserialize)]
pub struct ClusterList {
    pub clusters: Vec<ClusterView>,
    pub next_cursor: Option<String>,
}

/// `GET /v1/clusters/{id}`: the cluster and a page of its messages.
#[derive(Debug, Serialize, Deserialize)]
pub struct ClusterDetail {
    #[serde(flatten)]
    pub cluster: ClusterView,
    pub messages: Vec<MessageView>,
    pub next_cursor: Option<String>,
}

/// `POST /v1/clusters/{id}/action`.
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ActionInput {
    pub response_text: String,
    /// Answer the `review` members too (default: they are held back into
    /// open clusters of their own).
    #[serde(default)]
    pub include_review: bool,
}

/// `POST /v1/clusters/{id}/action`: the actioned cluster, which messages
/// the response answered and which were held back.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ActionResult {
    #[serde(flatten)]
    pub cluster: ClusterView,
    /// The ids of the messages the response answers: the cluster's members
    /// now, oldest first.
    pub answered: Vec<Uuid>,
    /// The `review` members that left the cluster unanswered, each into an
    /// open cluster of its own (`include_review: false`, the default).
    pub held_back: Vec<HeldBack>,
}

/// A review member an action held back, and the open cluster it is now in.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HeldBack {
    pub message_id: Uuid,
    pub cluster_id: Uuid,
}

/// `POST /v1/clusters/{id}/messages/{message_id}/confirm`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ConfirmResult {
    /// The cluster, its `core_size` one larger.
    pub cluster: ClusterView,
    /// The message, now a `core` member.
    pub message: MessageView,
}

/// `POST /v1/clusters/{id}/merge`: the clusters to merge into `{id}`.
/// Ids stay strings: one that is not an id names nothing (404, not 400).
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MergeInput {
    pub cluster_ids: Vec<String>,
}

/// `POST /v1/messages/{id}/move`: the open cluster the message moves to.
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MoveInput {
    pub cluster_id: String,
}

/// `POST /v1/messages/{id}/move`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MoveResult {
    /// The cluster the message moved to.
    pub cluster: ClusterView,
    /// The cluster it left; `None` when the message was its only member and
    /// the emptied cluster was deleted.
    pub from_cluster: Option<ClusterView>,
    /// The message, now in `cluster`.
    pub message: MessageView,
}

/// `DELETE /v1/clusters/{id}/messages/{message_id}`.
#[derive(Debug, Serialize, Deserialize)]
pub struct RemoveResult {
    /// The cluster the message left.
    pub cluster: ClusterView,
    /// The message, now in its new singleton cluster.
    pub message: MessageView,
}

/// The kinds of cluster events, as they appear in the `event` field and
/// in `events.kind`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Display, EnumString, IntoStaticStr)]
pub enum EventKind {
    #[serde(rename = "cluster.created")]
    #[strum(serialize = "cluster.created")]
    ClusterCreated,
    #[serde(rename = "cluster.updated")]
    #[strum(serialize = "cluster.updated")]
    ClusterUpdated,
    #[serde(rename = "cluster.actioned")]
    #[strum(serialize = "cluster.actioned")]
    ClusterActioned,
    #[serde(rename = "cluster.merged")]
    #[strum(serialize = "cluster.merged")]
    ClusterMerged,
    #[serde(rename = "message.removed")]
    #[strum(serialize = "message.removed")]
    MessageRemoved,
    /// A review member confirmed into its cluster's core.
    #[serde(rename = "message.confirmed")]
    #[strum(serialize = "message.confirmed")]
    MessageConfirmed,
}

/// A server event frame: `{"type": "event", ...}`. Stored as sent in the
/// durable log, so replay yields exactly what live subscribers saw.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EventFrame {
    #[serde(rename = "type")]
    pub frame_type: EventTag,
    pub event_id: i64,
    pub creator_id: String,
    pub event: EventKind,
    pub cluster: ClusterView,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<MessageView>,
    /// `message.removed` only: the singleton cluster the message moved to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub new_cluster: Option<ClusterView>,
    /// `cluster.merged` only: the clusters merged into `cluster`, which no
    /// longer exist.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub merged_cluster_ids: Option<Vec<Uuid>>,
    /// A move only (`cluster.updated` by a creator): the cluster the message
    /// left. Present on every move, even when that cluster was deleted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub from_cluster_id: Option<Uuid>,
    /// A move only: the cluster the message left, after the move; absent
    /// when the message was its only member and it was deleted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub from_cluster: Option<ClusterView>,
    pub at: DateTime<Utc>,
}

/// The constant `"event"` type tag of [`EventFrame`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum EventTag {
    Event,
}

/// The body of every error, over HTTP and in WebSocket error frames.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ErrorBody {
    pub code: String,
    pub message: String,
}

/// `{"error": {...}}`, the HTTP error envelope.
#[derive(Debug, Serialize, Deserialize)]
pub struct ErrorEnvelope {
    pub error: ErrorBody,
}

/// Frames a WebSocket client sends. Parsed in two steps (the envelope, then
/// the payload of its `type`) so that errors can echo the client's `id`.
#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "lowercase", deny_unknown_fields)]
pub enum ClientFrame {
    Subscribe {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        id: Option<serde_json::Value>,
        creator_id: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        since: Option<i64>,
    },
    Unsubscribe {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        id: Option<serde_json::Value>,
        creator_id: String,
    },
    Ingest {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        id: Option<serde_json::Value>,
        #[serde(deserialize_with = "object")]
        message: MessageInput,
    },
    Ping {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        id: Option<serde_json::Value>,
    },
    /// `POST /v1/clusters/{cluster_id}/action`.
    Action {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        id: Option<serde_json::Value>,
        cluster_id: String,
        response_text: String,
        #[serde(default)]
        include_review: bool,
    },
    /// `DELETE /v1/clusters/{cluster_id}/messages/{message_id}`.
    Remove {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        id: Option<serde_json::Value>,
        cluster_id: String,
        message_id: String,
    },
    /// `POST /v1/clusters/{cluster_id}/merge`.
    Merge {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        id: Option<serde_json::Value>,
        cluster_id: String,
        cluster_ids: Vec<String>,
    },
    /// `POST /v1/messages/{message_id}/move`.
    Move {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        id: Option<serde_json::Value>,
        message_id: String,
        cluster_id: String,
    },
    /// `POST /v1/clusters/{cluster_id}/messages/{message_id}/confirm`.
    Confirm {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        id: Option<serde_json::Value>,
        cluster_id: String,
        message_id: String,
    },
}

impl ClientFrame {
    /// The client's `id`, echoed in the reply.
    pub fn id(&self) -> Option<&serde_json::Value> {
        match self {
            Self::Subscribe { id, .. }
            | Self::Unsubscribe { id, .. }
            | Self::Ingest { id, .. }
            | Self::Ping { id }
            | Self::Action { id, .. }
            | Self::Remove { id, .. }
            | Self::Merge { id, .. }
            | Self::Move { id, .. }
            | Self::Confirm { id, .. } => id.as_ref(),
        }
    }
}

/// A WebSocket text frame the server refused, before it did anything.
#[derive(Debug, Clone, PartialEq)]
pub struct FrameError {
    /// The client's `id`, echoed in the error frame when it was a string or
    /// a number.
    pub id: Option<serde_json::Value>,
    pub message: String,
}

/// Parses a WebSocket text frame as the server does: JSON first, then the
/// payload of its `type`, so that a frame with a bad payload still gets its
/// `id` echoed. The payload's field values are validated later, by
/// [`crate::domain::validate`].
pub fn parse_client_frame(text: &str) -> Result<ClientFrame, FrameError> {
    let value: serde_json::Value =
        serde_json::from_str(text).map_err(|e| FrameError { id: None, message: format!("invalid JSON: {e}") })?;
    let id = value.get("id").filter(|v| v.is_string() || v.is_number()).cloned();
    // An internally tagged enum also takes an array whose first item is the
    // tag (`["ping"]`): only an object is a frame.
    from_object(value).map_err(|e| FrameError { id, message: format!("invalid frame: {e}") })
}

/// A creator operation, as named in a WebSocket `result` frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Operation {
    Action,
    Remove,
    Merge,
    Move,
    Confirm,
}

/// Replies the server sends to client frames (events are [`EventFrame`]).
#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "lowercase")]
pub enum ServerFrame {
    Subscribed {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        id: Option<serde_json::Value>,
        creator_id: String,
        last_event_id: i64,
    },
    Unsubscribed {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        id: Option<serde_json::Value>,
        creator_id: String,
    },
    Ack {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        id: Option<serde_json::Value>,
        message_id: Uuid,
        status: MessageStatus,
        cluster_id: Option<Uuid>,
        duplicate: bool,
    },
    Pong {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        id: Option<serde_json::Value>,
    },
    /// The answer to a creator operation: `result` is the body its HTTP
    /// endpoint answers with 200.
    Result {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        id: Option<serde_json::Value>,
        op: Operation,
        result: serde_json::Value,
    },
    Error {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        id: Option<serde_json::Value>,
        error: ErrorBody,
    },
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_json_objects_are_client_frames() {
        assert!(matches!(parse_client_frame(r#"{"type": "ping", "id": 1}"#), Ok(ClientFrame::Ping { .. })));
        for text in [r#"["ping"]"#, r#"["subscribe", null, "c1"]"#, "null", "5", r#""ping""#, "{", ""] {
            assert_eq!(parse_client_frame(text).map_err(|e| e.id).err(), Some(None), "{text}");
        }
        let refused = parse_client_frame(r#"{"type": "dance", "id": "d-1"}"#).expect_err("an unknown type");
        assert_eq!(refused.id, Some(serde_json::json!("d-1")));
        let refused = parse_client_frame(r#"{"type": "dance", "id": {"x": 1}}"#).expect_err("an unknown type");
        assert_eq!(refused.id, None, "only a string or number id is echoed in an error");
    }

    #[test]
    fn numbers_parse_to_the_nearest_f64() {
        // serde_json's float_roundtrip feature; without it the second is
        // read as 1.3333333333333337 and the first as 1.3333333333333335.
        let value: serde_json::Value =
            serde_json::from_str("[1.3333333333333337, 1.3333333333333333333335]").expect("JSON");
        assert_eq!(value.to_string(), "[1.3333333333333337,1.3333333333333333]");
    }

    #[test]
    fn a_visitor_is_an_object() {
        let message = |visitor: &str| {
            from_object::<MessageInput>(
                serde_json::from_str(&format!(r#"{{"creator_id": "c", "text": "t", "visitor": {visitor}}}"#))
                    .expect("JSON"),
            )
        };
        assert_eq!(message(r#"{"id": "v"}"#).expect("an object").visitor.and_then(|v| v.id), Some("v".into()));
        assert!(message("null").expect("null is no visitor").visitor.is_none());
        assert!(message(r#"["v", "Ana", "https://x/a.png"]"#).is_err());
        assert!(message(r#""v""#).is_err());
    }
}
