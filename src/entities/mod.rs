//! sea-orm entities of the tables created by `clusterd-migration`.

pub mod cluster;
pub mod creator;
pub mod event;
pub mod message;
