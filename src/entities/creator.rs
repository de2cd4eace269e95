//! Per creator: the last event id handed out, and what its clustering
//! decisions adapt to (its background and its learned bar offset).

use sea_orm::entity::prelude::*;

#[derive(Clone, Debug, PartialEq, DeriveEntityModel)]
#[sea_orm(table_name = "creators")]
pub struct Model {
    #[sea_orm(primary_key, auto_increment = false)]
    pub creator_id: String,
    pub last_event_id: i64,
    /// Sum of the creator's clustered messages' embeddings.
    pub background_sum: Option<PgVector>,
    pub background_count: i64,
    /// Added to the clustering bars; learned from corrections.
    pub bar_offset: f32,
}

#[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
pub enum Relation {}

impl ActiveModelBehavior for ActiveModel {}
