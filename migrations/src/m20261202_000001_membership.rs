//! Precision first: each clustered message's `membership` (`core`: a reply
//! to its cluster answers it; `review`: it joined on weaker evidence and
//! waits for the creator) and the similarity that placed it; each cluster's
//! `core_size`, with `centroid` now the sum of its *core* members only (a
//! review member does not shape the cluster it waits in); and per creator
//! what the decision adapts to: the sum and count of its embeddings (its
//! background similarity) and `bar_offset`, the shift of its bars learned
//! from its corrections.
//!
//! Existing members become `core`, as they were answered before.

use sea_orm_migration::prelude::*;

#[derive(DeriveMigrationName)]
pub struct Migration;

const UP: &str = r#"
ALTER TABLE messages
    ADD COLUMN membership text CHECK (membership IN ('core', 'review')),
    ADD COLUMN similarity real;
UPDATE messages SET membership = 'core' WHERE cluster_id IS NOT NULL;
ALTER TABLE messages ADD CONSTRAINT messages_membership_with_cluster
    CHECK ((cluster_id IS NULL) = (membership IS NULL));

ALTER TABLE clusters ADD COLUMN core_size integer NOT NULL DEFAULT 0 CHECK (core_size >= 0);
UPDATE clusters SET core_size = size;
ALTER TABLE clusters ADD CONSTRAINT clusters_core_within_size CHECK (core_size <= size);

ALTER TABLE creators
    ADD COLUMN background_sum vector,
    ADD COLUMN background_count bigint NOT NULL DEFAULT 0,
    ADD COLUMN bar_offset real NOT NULL DEFAULT 0;
UPDATE creators c SET background_sum = s.total, background_count = s.n
FROM (SELECT creator_id, sum(embedding) AS total, count(*) AS n
      FROM messages WHERE embedding IS NOT NULL AND cluster_id IS NOT NULL GROUP BY creator_id) AS s
WHERE s.creator_id = c.creator_id;
"#;

const DOWN: &str = r#"
ALTER TABLE creators DROP COLUMN bar_offset, DROP COLUMN background_count, DROP COLUMN background_sum;
ALTER TABLE clusters DROP CONSTRAINT clusters_core_within_size, DROP COLUMN core_size;
ALTER TABLE messages DROP CONSTRAINT messages_membership_with_cluster, DROP COLUMN similarity, DROP COLUMN membership;
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
