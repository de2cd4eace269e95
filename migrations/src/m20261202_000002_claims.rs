//! Work shared across instances: each running instance has a row in
//! `instances` that it renews (`alive_until`), and each unfinished message
//! names the instance that has it in hand (`claimed_by`: the one that
//! ingested it, or the recovery sweep that claimed it) and since when
//! (`claimed_at`, the database's clock). A sweep claims
//! only messages nobody alive holds, so instances sharing one database
//! never embed or cluster the same message twice, except after a crash
//! (the dead instance's work is taken over once its row expires).
//!
//! `name` is where an instance listens (host name and bound address): only
//! one process at a time can listen there, so a new instance that bound it
//! retires a row of the same name at once, as its crashed predecessor's.
//!
//! Existing messages are unclaimed: the first sweep of any instance takes them.

use sea_orm_migration::prelude::*;

#[derive(DeriveMigrationName)]
pub struct Migration;

const UP: &str = r#"
CREATE TABLE instances (
    id          uuid PRIMARY KEY,
    started_at  timestamptz NOT NULL DEFAULT now(),
    name        text,
    alive_until timestamptz NOT NULL
);
CREATE INDEX instances_name ON instances (name);
ALTER TABLE messages ADD COLUMN claimed_by uuid, ADD COLUMN claimed_at timestamptz;
"#;

const DOWN: &str = r#"
ALTER TABLE messages DROP COLUMN claimed_at, DROP COLUMN claimed_by;
DROP TABLE instances;
"#;

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
