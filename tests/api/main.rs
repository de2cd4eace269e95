//! Integration tests: the real server on port 0, a fresh PostgreSQL
//! database per test, real HTTP and WebSocket clients.

mod auth;
mod cache;
mod clustering;
mod embedding;
mod errors;
mod events;
mod fake_openai;
mod faults;
mod helpers;
mod hostile;
mod ingest;
mod instances;
mod membership;
mod model;
mod nginx;
mod openai;
mod operations;
mod pgbouncer;
mod plans;
mod pressure;
mod races;
mod restart;
mod sharing;
mod shutdown;
