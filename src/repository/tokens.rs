//! API tokens: created and revoked by the `clusterd token` commands, looked
//! up by hash on every request the cache has not seen lately.

use chrono::{DateTime, Utc};
use sea_orm::{ConnectionTrait, FromQueryResult};
use uuid::Uuid;

use super::{RepoError, Repository, stmt};
use crate::domain::token::{Scope, TokenHash};

/// A token as `clusterd token list` shows it; the secret is never stored.
#[derive(Debug, Clone, serde::Serialize)]
pub struct TokenInfo {
    pub id: Uuid,
    pub scope: String,
    pub name: String,
    pub created_at: DateTime<Utc>,
    pub revoked_at: Option<DateTime<Utc>>,
}

#[derive(Debug, FromQueryResult)]
struct TokenRow {
    id: Uuid,
    scope: String,
    creator_id: Option<String>,
    name: String,
    created_at: DateTime<Utc>,
    revoked_at: Option<DateTime<Utc>>,
}

impl TokenRow {
    fn scope(&self) -> Result<Scope, RepoError> {
        Scope::from_columns(&self.scope, self.creator_id.clone())
            .ok_or_else(|| RepoError::Invalid(format!("token {} has a malformed scope", self.id)))
    }
}

impl Repository {
    /// Stores a new token's hash; returns its id.
    pub async fn create_token(&self, hash: &TokenHash, scope: &Scope, name: &str) -> Result<Uuid, RepoError> {
        let id = Uuid::now_v7();
        self.db
            .execute_raw(stmt(
                "INSERT INTO api_tokens (id, hash, scope, creator_id, name, created_at) VALUES ($1, $2, $3, $4, $5, now())",
                [
                    id.into(),
                    hash.to_vec().into(),
                    scope.kind().into(),
                    scope.creator_id().map(str::to_owned).into(),
                    name.into(),
                ],
            ))
            .await?;
        Ok(id)
    }

    /// Revokes the active tokens named `name`; how many there were.
    pub async fn revoke_tokens_named(&self, name: &str) -> Result<u64, RepoError> {
        let done = self
            .db
            .execute_raw(stmt(
                "UPDATE api_tokens SET revoked_at = now() WHERE name = $1 AND revoked_at IS NULL",
                [name.into()],
            ))
            .await?;
        Ok(done.rows_affected())
    }

    /// Revokes a token. `NotFound` if no active token has that id.
    pub async fn revoke_token(&self, id: Uuid) -> Result<(), RepoError> {
        let done = self
            .db
            .execute_raw(stmt(
                "UPDATE api_tokens SET revoked_at = now() WHERE id = $1 AND revoked_at IS NULL",
                [id.into()],
            ))
            .await?;
        if done.rows_affected() == 0 {
            return Err(RepoError::NotFound);
        }
        Ok(())
    }

    /// Every token, oldest first.
    pub async fn tokens(&self) -> Result<Vec<TokenInfo>, RepoError> {
        let rows = TokenRow::find_by_statement(stmt(
            "SELECT id, scope, creator_id, name, created_at, revoked_at FROM api_tokens ORDER BY id",
            [],
        ))
        .all(&self.db)
        .await?;
        rows.into_iter()
            .map(|row| {
                Ok(TokenInfo {
                    id: row.id,
                    scope: row.scope()?.to_string(),
                    name: row.name,
                    created_at: row.created_at,
                    revoked_at: row.revoked_at,
                })
            })
            .collect()
    }

    /// The id and scope of the active token with this hash, if any.
    pub async fn active_token(&self, hash: &TokenHash) -> Result<Option<(Uuid, Scope)>, RepoError> {
        let row = TokenRow::find_by_statement(stmt(
            "SELECT id, scope, creator_id, name, created_at, revoked_at FROM api_tokens \
             WHERE hash = $1 AND revoked_at IS NULL",
            [hash.to_vec().into()],
        ))
        .one(&self.db)
        .await?;
        row.map(|row| Ok((row.id, row.scope()?))).transpose()
    }

    /// The creator a cluster belongs to (it never changes).
    pub async fn cluster_owner(&self, id: Uuid) -> Result<String, RepoError> {
        let row = self.db.query_one_raw(stmt("SELECT creator_id FROM clusters WHERE id = $1", [id.into()])).await?;
        Ok(row.ok_or(RepoError::NotFound)?.try_get("", "creator_id")?)
    }

    /// The creator a message belongs to (it never changes).
    pub async fn message_owner(&self, id: Uuid) -> Result<String, RepoError> {
        let row = self.db.query_one_raw(stmt("SELECT creator_id FROM messages WHERE id = $1", [id.into()])).await?;
        Ok(row.ok_or(RepoError::NotFound)?.try_get("", "creator_id")?)
    }
}
