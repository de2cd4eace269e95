//! Integration tests: the real server on port 0, a fresh PostgreSQL
//! database per test, real HTTP and WebSocket clients.

mod clustering;
mod errors;
mod events;
mod helpers;
mod ingest;
mod instances;
mod model;
mod operations;
mod plans;
mod restart;
