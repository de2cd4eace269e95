//! A cluster of similar messages of one creator.

use sea_orm::entity::prelude::*;

use crate::protocol::ClusterStatus;

#[derive(Clone, Debug, PartialEq, DeriveEntityModel)]
#[sea_orm(table_name = "clusters")]
pub struct Model {
    #[sea_orm(primary_key, auto_increment = false)]
    pub id: Uuid,
    pub creator_id: String,
    pub status: ClusterStatus,
    /// Members, core and review.
    pub size: i32,
    /// Members a reply answers.
    pub core_size: i32,
    pub label: String,
    /// Sum of the core members' embeddings (the direction of their mean).
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
