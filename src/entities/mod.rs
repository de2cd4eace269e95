//! sea-orm entities of the tables created by `clusterd-migration`, for the
//! statements that are plain CRUD (see `crate::repository` for which those
//! are). The `events` table has none: it is only appended to in bulk and
//! read as text, both in SQL.

pub mod api_token;
pub mod cluster;
pub mod creator;
pub mod message;
