//! API tokens: created and revoked by the `clusterd token` commands, looked
//! up by hash on every request the cache has not seen lately; and the
//! owner lookups the authenticator makes. All plain CRUD, through the
//! entities.

use chrono::{DateTime, Utc};
use sea_orm::{ActiveModelTrait, ActiveValue::Set, ColumnTrait, EntityTrait, QueryFilter, QueryOrder, sea_query::Expr};
use uuid::Uuid;

use super::{RepoError, Repository, column_by_id};
use crate::{
    domain::token::{Scope, TokenHash},
    entities::{api_token, cluster, message},
};

/// A token as `clusterd token list` shows it; the secret is never stored.
#[derive(Debug, Clone, serde::Serialize)]
pub struct TokenInfo {
    pub id: Uuid,
    pub scope: String,
    pub name: String,
    pub created_at: DateTime<Utc>,
    pub revoked_at: Option<DateTime<Utc>>,
}

fn scope(token: &api_token::Model) -> Result<Scope, RepoError> {
    Scope::from_columns(&token.scope, token.creator_id.clone())
        .ok_or_else(|| RepoError::Invalid(format!("token {} has a malformed scope", token.id)))
}

/// Revokes the active tokens `filter` selects; how many there were.
async fn revoke(repo: &Repository, filter: impl sea_orm::sea_query::IntoCondition) -> Result<u64, RepoError> {
    let done = api_token::Entity::update_many()
        .col_expr(api_token::Column::RevokedAt, Expr::current_timestamp())
        .filter(filter)
        .filter(api_token::Column::RevokedAt.is_null())
        .exec(&repo.db)
        .await?;
    Ok(done.rows_affected)
}

impl Repository {
    /// Stores a new token's hash; returns its id.
    pub async fn create_token(&self, hash: &TokenHash, scope: &Scope, name: &str) -> Result<Uuid, RepoError> {
        let token = api_token::ActiveModel {
            id: Set(Uuid::now_v7()),
            hash: Set(hash.to_vec()),
            scope: Set(scope.kind().to_owned()),
            creator_id: Set(scope.creator_id().map(str::to_owned)),
            name: Set(name.to_owned()),
            created_at: Set(Utc::now()),
            revoked_at: Set(None),
        };
        Ok(token.insert(&self.db).await?.id)
    }

    /// Revokes the active tokens named `name`; how many there were.
    pub async fn revoke_tokens_named(&self, name: &str) -> Result<u64, RepoError> {
        revoke(self, api_token::Column::Name.eq(name)).await
    }

    /// Revokes a token. `NotFound` if no active token has that id.
    pub async fn revoke_token(&self, id: Uuid) -> Result<(), RepoError> {
        match revoke(self, api_token::Column::Id.eq(id)).await? {
            0 => Err(RepoError::NotFound),
            _ => Ok(()),
        }
    }

    /// Every token, oldest first.
    pub async fn tokens(&self) -> Result<Vec<TokenInfo>, RepoError> {
        let tokens = api_token::Entity::find().order_by_asc(api_token::Column::Id).all(&self.db).await?;
        tokens
            .into_iter()
            .map(|token| {
                Ok(TokenInfo {
                    scope: scope(&token)?.to_string(),
                    id: token.id,
                    name: token.name,
                    created_at: token.created_at,
                    revoked_at: token.revoked_at,
                })
            })
            .collect()
    }

    /// The id and scope of the active token with this hash, if any.
    pub async fn active_token(&self, hash: &TokenHash) -> Result<Option<(Uuid, Scope)>, RepoError> {
        let token = api_token::Entity::find()
            .filter(api_token::Column::Hash.eq(hash.to_vec()))
            .filter(api_token::Column::RevokedAt.is_null())
            .one(&self.db)
            .await?;
        token.map(|token| Ok((token.id, scope(&token)?))).transpose()
    }

    /// The creator a cluster belongs to (it never changes).
    pub async fn cluster_owner(&self, id: Uuid) -> Result<String, RepoError> {
        column_by_id::<cluster::Entity, _>(&self.db, id, cluster::Column::CreatorId).await?.ok_or(RepoError::NotFound)
    }

    /// The creator a message belongs to (it never changes).
    pub async fn message_owner(&self, id: Uuid) -> Result<String, RepoError> {
        column_by_id::<message::Entity, _>(&self.db, id, message::Column::CreatorId).await?.ok_or(RepoError::NotFound)
    }
}
