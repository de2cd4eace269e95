//! API tokens. Only a SHA-256 hash of each token is stored: a token is 256
//! random bits, so a fast hash is as safe as a slow one, and a leaked table
//! gives nobody a usable token.

use sea_orm_migration::prelude::*;

#[derive(DeriveMigrationName)]
pub struct Migration;

const UP: &str = r#"
CREATE TABLE api_tokens (
    id         uuid PRIMARY KEY,
    hash       bytea NOT NULL UNIQUE,
    scope      text NOT NULL CHECK (scope IN ('ingest', 'creator', 'admin')),
    creator_id text CHECK ((scope = 'creator') = (creator_id IS NOT NULL)),
    name       text NOT NULL DEFAULT '',
    created_at timestamptz NOT NULL,
    revoked_at timestamptz
);
"#;

const DOWN: &str = "DROP TABLE api_tokens;";

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager.get_connection().execute_unprepared(UP).await?;
        Ok(())
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager.get_connection().execute_unprepared(DOWN).await?;
        Ok(())
    }
}
