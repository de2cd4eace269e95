//! A cluster of similar messages of one creator.

use sea_orm::entity::prelude::*;

use crate::protocol::{ClusterStatus, ClusterView};

#[derive(Clone, Debug, PartialEq, DeriveEntityModel)]
#[sea_orm(table_name = "clusters")]
pub struct Model {
    #[sea_orm(primary_key, auto_increment = false)]
    pub id: Uuid,
    pub creator_id: String,
    /// `open` | `actioned`.
    pub status: String,
    pub size: i32,
    pub label: String,
    /// Sum of the member embeddings (the direction of their mean).
    pub centroid: PgVector,
    pub response_text: Option<String>,
    pub suggested_response: Option<String>,
    pub actioned_at: Option<DateTimeUtc>,
    pub created_at: DateTimeUtc,
    pub updated_at: DateTimeUtc,
}

#[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
pub enum Relation {
    #[sea_orm(has_many = "super::message::Entity")]
    Message,
}

impl Related<super::message::Entity> for Entity {
    fn to() -> RelationDef {
        Relation::Message.def()
    }
}

impl ActiveModelBehavior for ActiveModel {}

impl Model {
    pub fn view(&self) -> ClusterView {
        ClusterView {
            id: self.id,
            creator_id: self.creator_id.clone(),
            // The schema's CHECK constraint admits only the two statuses.
            status: ClusterStatus::parse(&self.status).unwrap_or(ClusterStatus::Open),
            size: self.size,
            label: self.label.clone(),
            response_text: self.response_text.clone(),
            suggested_response: self.suggested_response.clone(),
            actioned_at: self.actioned_at,
            created_at: self.created_at,
            updated_at: self.updated_at,
            sample_messages: None,
        }
    }
}
