//! Integration tests: the real server on port 0, a fresh PostgreSQL
//! database per test, real HTTP and WebSocket clients.

mod clustering;
mod embedding;
mod errors;
mod events;
mod fake_openai;
mod helpers;
mod hostile;
mod ingest;
mod instances;
mod model;
mod openai;
mod operations;
mod plans;
mod races;
mod restart;
