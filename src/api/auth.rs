//! Who is asking, and may they: bearer tokens, scopes and per-token rate
//! limits.
//!
//! The [`authenticate`] middleware runs before routing for everything but
//! `/healthz` and `/readyz`: it reads the token (`Authorization: Bearer`,
//! or `?token=` on `/v1/ws`), resolves it through a small cache in front of
//! the database, charges the token's rate limit, and leaves a [`Principal`]
//! in the request for the handlers, which check its scope against what
//! they touch. The WebSocket session keeps its principal, checks every
//! frame, and revalidates the token on each heartbeat, so a revoked token
//! loses its stream too.
//!
//! With Redis configured, a token's budget is shared by every instance
//! (see [`super::shared_rate`]); while Redis fails or is slow, each
//! instance applies the same limit alone, in process, and returns to the
//! shared budget by itself when Redis answers again.

use std::{
    net::IpAddr,
    num::{NonZeroU32, NonZeroUsize},
    sync::Mutex,
    time::{Duration, Instant},
};

use actix_web::{
    FromRequest, HttpMessage, HttpRequest, ResponseError,
    body::{EitherBody, MessageBody},
    dev::{Payload, ServiceRequest, ServiceResponse},
    http::header,
    middleware::Next,
    web,
};
use governor::{DefaultKeyedRateLimiter, Quota, clock::Clock};
use lru::LruCache;
use uuid::Uuid;

use super::{ApiError, ApiState, shared_rate::SharedRate};
use crate::{
    domain::token::{self, Scope, TokenHash},
    repository::Repository,
    settings::AuthSettings,
};

/// Tokens (and unknown tokens) remembered between database lookups.
const CACHE_ENTRIES: usize = 10_000;

/// The caller of a request: a token's scope, or everyone when auth is off.
#[derive(Debug, Clone)]
pub struct Principal {
    scope: Scope,
    /// The token's hash, to revalidate it; `None` when auth is off.
    token: Option<TokenHash>,
    /// Whose rate limit a request spends.
    rate_key: RateKey,
}

/// Rate limits are per token; with auth off, per client address.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
enum RateKey {
    Token(Uuid),
    Peer(Option<IpAddr>),
}

impl Principal {
    /// May send messages.
    pub fn may_ingest(&self) -> Result<(), ApiError> {
        match self.scope {
            Scope::Ingest | Scope::Admin => Ok(()),
            Scope::Creator(_) => Err(self.forbidden("send messages")),
        }
    }

    /// May read, subscribe to and act on `creator_id`'s clusters.
    pub fn may_act_for(&self, creator_id: &str) -> Result<(), ApiError> {
        match &self.scope {
            Scope::Admin => Ok(()),
            Scope::Creator(own) if own == creator_id => Ok(()),
            _ => Err(self.forbidden(&format!("access creator {creator_id}"))),
        }
    }

    /// May read a message of `creator_id` by its id: its creator, and the
    /// integrations that send messages (they follow what they sent).
    pub fn may_read_message(&self, creator_id: &str) -> Result<(), ApiError> {
        match self.scope {
            Scope::Ingest => Ok(()),
            _ => self.may_act_for(creator_id),
        }
    }

    pub fn require_admin(&self) -> Result<(), ApiError> {
        match self.scope {
            Scope::Admin => Ok(()),
            _ => Err(self.forbidden("use the operator endpoints")),
        }
    }

    /// Whether the token reaches every creator (so ownership lookups can be
    /// skipped).
    pub fn is_admin(&self) -> bool {
        self.scope == Scope::Admin
    }

    fn forbidden(&self, what: &str) -> ApiError {
        ApiError::Forbidden(format!("a token of scope {} may not {what}", self.scope))
    }
}

/// Handlers take the principal the middleware left in the request.
impl FromRequest for Principal {
    type Error = ApiError;
    type Future = std::future::Ready<Result<Self, ApiError>>;

    fn from_request(req: &HttpRequest, _: &mut Payload) -> Self::Future {
        std::future::ready(
            req.extensions()
                .get::<Principal>()
                .cloned()
                .ok_or_else(|| ApiError::Internal("no principal: the auth middleware is not installed".into())),
        )
    }
}

struct Cached {
    at: Instant,
    /// `None`: no active token has this hash.
    found: Option<(Uuid, Scope)>,
}

/// Resolves tokens to principals and keeps their rate limits.
pub struct Authenticator {
    enabled: bool,
    repo: Repository,
    cache_ttl: Duration,
    cache: Mutex<LruCache<TokenHash, Cached>>,
    limiter: Option<DefaultKeyedRateLimiter<RateKey>>,
    /// The budget shared across instances (Redis configured and a limit
    /// set); `limiter` decides while it cannot.
    shared: Option<SharedRate>,
    /// The largest cost a request may have (the burst).
    burst: u32,
}

impl Authenticator {
    pub fn new(settings: &AuthSettings, repo: Repository, shared: Option<SharedRate>) -> Self {
        if !settings.enabled {
            tracing::warn!(
                "AUTHENTICATION IS OFF (auth.enabled = false): anyone who can reach this port can read, change and \
                 send everything. Use this for local experiments only."
            );
        }
        let limiter = (settings.rate_per_sec > 0.0).then(|| {
            let quota = Quota::with_period(Duration::from_secs_f64(1.0 / settings.rate_per_sec))
                .expect("a positive rate has a non-zero period");
            DefaultKeyedRateLimiter::keyed(quota.allow_burst(settings.burst()))
        });
        Self {
            enabled: settings.enabled,
            repo,
            cache_ttl: settings.cache_ttl(),
            cache: Mutex::new(LruCache::new(NonZeroUsize::new(CACHE_ENTRIES).expect("non-zero"))),
            limiter,
            shared,
            burst: settings.burst().get(),
        }
    }

    /// The principal a request with this token acts as.
    pub async fn authenticate(&self, token: Option<&str>, peer: Option<IpAddr>) -> Result<Principal, ApiError> {
        if !self.enabled {
            return Ok(Principal { scope: Scope::Admin, token: None, rate_key: RateKey::Peer(peer) });
        }
        let token = token.ok_or_else(|| {
            ApiError::Unauthorized("a bearer token is required (Authorization: Bearer <token>)".into())
        })?;
        let hash = token::hash(token);
        let (id, scope) = self.lookup(&hash).await?;
        Ok(Principal { scope, token: Some(hash), rate_key: RateKey::Token(id) })
    }

    /// Checks that the principal's token is still active (revocation ends
    /// long-lived WebSocket sessions too).
    pub async fn revalidate(&self, principal: &Principal) -> Result<(), ApiError> {
        match &principal.token {
            Some(hash) => self.lookup(hash).await.map(drop),
            None => Ok(()),
        }
    }

    async fn lookup(&self, hash: &TokenHash) -> Result<(Uuid, Scope), ApiError> {
        let cached = {
            let mut cache = self.cache.lock().expect("token cache lock");
            cache.get(hash).filter(|c| c.at.elapsed() < self.cache_ttl).map(|c| c.found.clone())
        };
        let found = match cached {
            Some(found) => found,
            None => {
                let found = self.repo.active_token(hash).await?;
                let entry = Cached { at: Instant::now(), found: found.clone() };
                self.cache.lock().expect("token cache lock").put(*hash, entry);
                found
            }
        };
        found.ok_or_else(|| ApiError::Unauthorized("unknown or revoked token".into()))
    }

    /// Spends `cost` requests of the principal's rate limit: the shared
    /// budget in Redis when it answers, else this instance's own.
    pub async fn charge(&self, principal: &Principal, cost: usize) -> Result<(), ApiError> {
        let (Some(limiter), Some(cost)) = (&self.limiter, NonZeroU32::new(u32::try_from(cost).unwrap_or(u32::MAX)))
        else {
            return Ok(());
        };
        let refused = |wait: Duration| ApiError::RateLimited {
            message: "this token's rate limit is spent; retry later".into(),
            retry_after_secs: wait.as_secs_f64().ceil().max(1.0) as u64,
        };
        if cost.get() > self.burst {
            return Err(ApiError::RateLimited {
                message: format!("this request ({cost} messages) is larger than the token's rate limit burst"),
                retry_after_secs: 1,
            });
        }
        if let Some(shared) = &self.shared {
            match shared.charge(&principal.rate_key.to_string(), cost.get()).await {
                Ok(None) => return Ok(()),
                Ok(Some(wait)) => return Err(refused(wait)),
                Err(error) => tracing::debug!(%error, "the shared rate limit cannot decide; this instance's does"),
            }
        }
        match limiter.check_key_n(&principal.rate_key, cost) {
            Ok(Ok(())) => Ok(()),
            Ok(Err(not_until)) => Err(refused(not_until.wait_time_from(limiter.clock().now()))),
            Err(_) => Err(ApiError::RateLimited {
                message: format!("this request ({cost} messages) is larger than the token's rate limit burst"),
                retry_after_secs: 1,
            }),
        }
    }
}

/// The name of a budget in Redis.
impl std::fmt::Display for RateKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            RateKey::Token(id) => write!(f, "token:{id}"),
            RateKey::Peer(Some(ip)) => write!(f, "peer:{ip}"),
            RateKey::Peer(None) => write!(f, "peer:unknown"),
        }
    }
}

/// The token a request carries: `Authorization: Bearer <token>`, or on the
/// WebSocket route also `?token=<token>` (browsers cannot set headers on a
/// WebSocket).
fn bearer(req: &ServiceRequest) -> Option<String> {
    let header = req.headers().get(header::AUTHORIZATION).and_then(|v| v.to_str().ok());
    if let Some(value) = header {
        let (scheme, token) = value.split_once(' ')?;
        return scheme.eq_ignore_ascii_case("bearer").then(|| token.trim().to_owned());
    }
    if req.path() == "/v1/ws" {
        let query = web::Query::<TokenQuery>::from_query(req.query_string()).ok()?;
        return query.into_inner().token;
    }
    None
}

#[derive(serde::Deserialize)]
struct TokenQuery {
    token: Option<String>,
}

/// Routes anyone may reach: liveness and readiness probes.
fn is_public(path: &str) -> bool {
    matches!(path, "/healthz" | "/readyz")
}

/// The middleware: authenticates, charges one request, and leaves the
/// [`Principal`] for the handlers; refuses with 401 or 429 otherwise.
pub async fn authenticate(
    req: ServiceRequest,
    next: Next<impl MessageBody + 'static>,
) -> Result<ServiceResponse<EitherBody<impl MessageBody>>, actix_web::Error> {
    if is_public(req.path()) {
        return next.call(req).await.map(ServiceResponse::map_into_left_body);
    }
    let Some(state) = req.app_data::<web::Data<ApiState>>().cloned() else {
        return Err(ApiError::Internal("no application state".into()).into());
    };
    let peer = req.peer_addr().map(|addr| addr.ip());
    let token = bearer(&req);
    let checked = match state.auth.authenticate(token.as_deref(), peer).await {
        Ok(principal) => state.auth.charge(&principal, 1).await.map(|()| principal),
        Err(error) => Err(error),
    };
    match checked {
        Ok(principal) => {
            req.extensions_mut().insert(principal);
            next.call(req).await.map(ServiceResponse::map_into_left_body)
        }
        Err(error) => {
            state.metrics.auth_refused.with_label_values(&[error.code()]).inc();
            Ok(req.into_response(error.error_response()).map_into_right_body())
        }
    }
}
