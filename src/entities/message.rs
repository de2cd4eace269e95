//! A visitor's message and where it is in the pipeline.

use sea_orm::entity::prelude::*;

use crate::protocol::{Membership, MessageStatus};

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
    pub status: MessageStatus,
    pub error: Option<String>,
    pub cluster_id: Option<Uuid>,
    /// Set once clustered.
    pub membership: Option<Membership>,
    pub similarity: Option<f32>,
    pub embedding: Option<PgVector>,
    /// The instance that has this unfinished message in hand (see
    /// `crate::actors::recovery`); `None`: nobody, any sweep may take it.
    pub claimed_by: Option<Uuid>,
    /// When `claimed_by` took it (the database's clock).
    pub claimed_at: Option<DateTimeUtc>,
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
