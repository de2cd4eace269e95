//! Messages, clusters, the per-creator event log, and the indexes the hot
//! queries need.
//!
//! Index choices follow what was measured on the target machine: a creator's
//! candidates are few, so the clustering decision reads them through btree
//! indexes on the creator and sorts by exact distance; neither an HNSW index
//! over every message (about 3 ms of CPU per inserted vector) nor a trigram
//! index (10-100x slower per-creator lookups once the planner combines it
//! with the creator index) is created here. An HNSW index on open-cluster
//! centroids can be enabled through config (`index.hnsw_enabled`).

use sea_orm_migration::prelude::*;

#[derive(DeriveMigrationName)]
pub struct Migration;

const UP: &str = r#"
CREATE EXTENSION IF NOT EXISTS vector;
CREATE EXTENSION IF NOT EXISTS pg_trgm;

CREATE TABLE clusters (
    id                 uuid PRIMARY KEY,
    creator_id         text NOT NULL,
    status             text NOT NULL CHECK (status IN ('open', 'actioned')),
    size               integer NOT NULL CHECK (size >= 0),
    label              text NOT NULL,
    -- Sum of the member embeddings: it points where their mean does (cosine
    -- distance ignores the norm), and a join or removal is one + or -.
    centroid           vector NOT NULL,
    response_text      text,
    suggested_response text,
    actioned_at        timestamptz,
    created_at         timestamptz NOT NULL,
    updated_at         timestamptz NOT NULL
);
-- The clustering decision: a creator's open clusters.
CREATE INDEX clusters_open_by_creator ON clusters (creator_id) WHERE status = 'open';
-- Listing a creator's clusters, newest first or largest first.
CREATE INDEX clusters_by_creator_recent ON clusters (creator_id, updated_at DESC, id DESC);
CREATE INDEX clusters_by_creator_size ON clusters (creator_id, size DESC, id DESC);

CREATE TABLE messages (
    id          uuid PRIMARY KEY,
    creator_id  text NOT NULL,
    external_id text,
    text        text NOT NULL,
    -- SHA-256 of the normalised text: exact-duplicate matching and caching.
    norm_key    bytea NOT NULL,
    visitor     jsonb,
    raw_payload jsonb,
    sent_at     timestamptz NOT NULL,
    received_at timestamptz NOT NULL,
    status      text NOT NULL CHECK (status IN ('pending', 'embedded', 'clustered', 'failed')),
    error       text,
    cluster_id  uuid REFERENCES clusters (id),
    embedding   vector
);
-- Idempotency: NULL external ids never conflict with each other.
CREATE UNIQUE INDEX messages_external_id ON messages (creator_id, external_id);
-- Members of a cluster, in arrival order (ids are UUIDv7, time-ordered).
CREATE INDEX messages_by_cluster ON messages (cluster_id, id);
-- Exact normalised-text match within a creator.
CREATE INDEX messages_by_norm_key ON messages (creator_id, norm_key);
-- Work left to do: resumed at start and swept periodically.
CREATE INDEX messages_unfinished ON messages (received_at) WHERE status IN ('pending', 'embedded');

-- One row per creator: the last event id handed out. Updated under the
-- creator's advisory lock, so ids increase by exactly one per event.
CREATE TABLE creators (
    creator_id    text PRIMARY KEY,
    last_event_id bigint NOT NULL
);

-- The durable, ordered event log that feeds the WebSocket stream and replay.
CREATE TABLE events (
    creator_id text NOT NULL,
    event_id   bigint NOT NULL,
    kind       text NOT NULL,
    payload    jsonb NOT NULL,
    created_at timestamptz NOT NULL,
    PRIMARY KEY (creator_id, event_id)
);
"#;

const DOWN: &str = r#"
DROP TABLE events;
DROP TABLE creators;
DROP TABLE messages;
DROP TABLE clusters;
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
