//! A visitor's message and where it is in the pipeline.

use sea_orm::entity::prelude::*;

use crate::protocol::{MessageStatus, MessageView, Visitor};

#[derive(Clone, Debug, PartialEq, DeriveEntityModel)]
#[sea_orm(table_name = "messages")]
pub struct Model {
    #[sea_orm(primary_key, auto_increment = false)]
    pub id: Uuid,
    pub creator_id: String,
    pub external_id: Option<String>,
    pub text: String,
    /// SHA-256 of the normalised text.
    pub norm_key: Vec<u8>,
    pub visitor: Option<Json>,
    pub raw_payload: Option<Json>,
    pub sent_at: DateTimeUtc,
    pub received_at: DateTimeUtc,
    /// `pending` | `embedded` | `clustered` | `failed`.
    pub status: String,
    pub error: Option<String>,
    pub cluster_id: Option<Uuid>,
    pub embedding: Option<PgVector>,
}

#[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
pub enum Relation {
    #[sea_orm(belongs_to = "super::cluster::Entity", from = "Column::ClusterId", to = "super::cluster::Column::Id")]
    Cluster,
}

impl Related<super::cluster::Entity> for Entity {
    fn to() -> RelationDef {
        Relation::Cluster.def()
    }
}

impl ActiveModelBehavior for ActiveModel {}

/// Builds the API view of a message from its columns.
#[allow(clippy::too_many_arguments)]
pub fn view(
    id: Uuid,
    creator_id: &str,
    external_id: Option<String>,
    text: &str,
    visitor: Option<Json>,
    status: &str,
    cluster_id: Option<Uuid>,
    sent_at: DateTimeUtc,
    received_at: DateTimeUtc,
    error: Option<String>,
) -> MessageView {
    // The schema's CHECK constraint admits only the four statuses.
    let status = MessageStatus::parse(status).unwrap_or(MessageStatus::Pending);
    MessageView {
        id,
        creator_id: creator_id.to_owned(),
        external_id,
        text: text.to_owned(),
        visitor: visitor.and_then(|v| serde_json::from_value::<Visitor>(v).ok()),
        status,
        cluster_id,
        sent_at,
        received_at,
        error: if status == MessageStatus::Failed { error } else { None },
    }
}
