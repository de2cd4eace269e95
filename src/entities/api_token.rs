//! An API token: its SHA-256 (the secret itself is never stored), scope and
//! name, for `clusterd token` and the authenticator.

use sea_orm::entity::prelude::*;

#[derive(Clone, Debug, PartialEq, DeriveEntityModel)]
#[sea_orm(table_name = "api_tokens")]
pub struct Model {
    #[sea_orm(primary_key, auto_increment = false)]
    pub id: Uuid,
    /// SHA-256 of the secret.
    pub hash: Vec<u8>,
    /// `ingest` | `creator` | `admin` (see `domain::token::Scope`).
    pub scope: String,
    /// Set exactly for the `creator` scope.
    pub creator_id: Option<String>,
    pub name: String,
    pub created_at: DateTimeUtc,
    pub revoked_at: Option<DateTimeUtc>,
}

#[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
pub enum Relation {}

impl ActiveModelBehavior for ActiveModel {}
