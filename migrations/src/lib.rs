//! Schema migrations of clusterd, applied by `clusterd serve` at start, by
//! `clusterd migrate`, and by the tests on their own databases.
//!
//! The embedding columns are created as unconstrained `vector`: their
//! dimension comes from the daemon's configuration, which a migration cannot
//! see, so the daemon pins it (`vector(D)`) right after migrating and refuses
//! to start when the database already holds another dimension.

pub use sea_orm_migration::prelude::*;

mod m20261125_000001_init;
mod m20261126_000001_tokens;
mod m20261202_000001_membership;
mod m20261202_000002_claims;

/// Every migration of clusterd, in order.
pub struct Migrator;

#[async_trait::async_trait]
impl MigratorTrait for Migrator {
    fn migrations() -> Vec<Box<dyn MigrationTrait>> {
        vec![
            Box::new(m20261125_000001_init::Migration),
            Box::new(m20261126_000001_tokens::Migration),
            Box::new(m20261202_000001_membership::Migration),
            Box::new(m20261202_000002_claims::Migration),
        ]
    }
}
