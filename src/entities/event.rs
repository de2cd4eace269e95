//! One entry of a creator's durable event log.

use sea_orm::entity::prelude::*;

#[derive(Clone, Debug, PartialEq, DeriveEntityModel)]
#[sea_orm(table_name = "events")]
pub struct Model {
    #[sea_orm(primary_key, auto_increment = false)]
    pub creator_id: String,
    /// Strictly increasing by one per creator.
    #[sea_orm(primary_key, auto_increment = false)]
    pub event_id: i64,
    pub kind: String,
    /// The event frame exactly as subscribers receive it.
    pub payload: Json,
    pub created_at: DateTimeUtc,
}

#[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
pub enum Relation {}

impl ActiveModelBehavior for ActiveModel {}
