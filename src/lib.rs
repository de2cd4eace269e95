//! clusterd: clusters the messages visitors send to a creator by
//! similarity, live. See the README for the architecture.

pub mod actors;
pub mod api;
pub mod clustering;
pub mod domain;
pub mod embedding;
pub mod entities;
pub mod metrics;
pub mod operations;
pub mod protocol;
pub mod query_cache;
pub mod redis_link;
pub mod repository;
pub mod settings;
pub mod startup;
pub mod telemetry;
