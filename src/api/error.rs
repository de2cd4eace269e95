//! The API's error type: every failure a handler can meet, mapped to an
//! HTTP status and the `{"error": {"code", "message"}}` body. 5xx causes
//! are logged and stay opaque to clients; 503 carries `Retry-After`.

use actix_web::{
    HttpResponse, ResponseError,
    error::{JsonPayloadError, PathError, QueryPayloadError},
    http::{StatusCode, header},
};

use crate::{
    actors::ingest::IngestError,
    domain::validate::ValidationError,
    protocol::{ErrorBody, ErrorEnvelope},
    repository::RepoError,
};

/// Seconds a client should wait before retrying a 503.
const RETRY_AFTER_SECS: &str = "1";

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("{0}")]
    InvalidRequest(String),
    /// No token, or one that is unknown or revoked.
    #[error("{0}")]
    Unauthorized(String),
    /// A valid token whose scope does not cover the request.
    #[error("{0}")]
    Forbidden(String),
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    Conflict(String),
    #[error("{0}")]
    PayloadTooLarge(String),
    /// The token's rate limit is spent; retry after this many seconds.
    #[error("{message}")]
    RateLimited { message: String, retry_after_secs: u64 },
    #[error("{0}")]
    Unavailable(String),
    #[error("internal error")]
    Internal(String),
}

impl ApiError {
    pub fn code(&self) -> &'static str {
        match self {
            Self::InvalidRequest(_) => "invalid_request",
            Self::Unauthorized(_) => "unauthorized",
            Self::Forbidden(_) => "forbidden",
            Self::NotFound(_) => "not_found",
            Self::Conflict(_) => "conflict",
            Self::PayloadTooLarge(_) => "payload_too_large",
            Self::RateLimited { .. } => "rate_limited",
            Self::Unavailable(_) => "unavailable",
            Self::Internal(_) => "internal",
        }
    }

    /// The body clients see; internal details never leave the server.
    pub fn body(&self) -> ErrorBody {
        let message = match self {
            Self::Internal(_) => "internal error".to_owned(),
            other => other.to_string(),
        };
        ErrorBody { code: self.code().to_owned(), message }
    }

    pub fn not_found(what: &str) -> Self {
        Self::NotFound(format!("{what} not found"))
    }

    /// Maps a repository error, naming what was not found (where a bare
    /// "not found" would leave the client guessing).
    pub fn missing(what: &'static str) -> impl Fn(RepoError) -> Self {
        move |e| match e {
            RepoError::NotFound => Self::not_found(what),
            other => other.into(),
        }
    }
}

impl ResponseError for ApiError {
    fn status_code(&self) -> StatusCode {
        match self {
            Self::InvalidRequest(_) => StatusCode::BAD_REQUEST,
            Self::Unauthorized(_) => StatusCode::UNAUTHORIZED,
            Self::Forbidden(_) => StatusCode::FORBIDDEN,
            Self::NotFound(_) => StatusCode::NOT_FOUND,
            Self::Conflict(_) => StatusCode::CONFLICT,
            Self::PayloadTooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            Self::RateLimited { .. } => StatusCode::TOO_MANY_REQUESTS,
            Self::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
            Self::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    fn error_response(&self) -> HttpResponse {
        if let Self::Internal(cause) = self {
            tracing::error!(%cause, "request failed");
        }
        let mut response = HttpResponse::build(self.status_code());
        match self {
            Self::Unavailable(_) => {
                response.insert_header((header::RETRY_AFTER, RETRY_AFTER_SECS));
            }
            Self::RateLimited { retry_after_secs, .. } => {
                response.insert_header((header::RETRY_AFTER, retry_after_secs.to_string()));
            }
            Self::Unauthorized(_) => {
                response.insert_header((header::WWW_AUTHENTICATE, "Bearer"));
            }
            _ => {}
        }
        response.json(ErrorEnvelope { error: self.body() })
    }
}

impl From<ValidationError> for ApiError {
    fn from(err: ValidationError) -> Self {
        match err {
            ValidationError::Invalid(m) => Self::InvalidRequest(m),
            ValidationError::TooLarge(m) => Self::PayloadTooLarge(m),
        }
    }
}

impl From<RepoError> for ApiError {
    fn from(err: RepoError) -> Self {
        match err {
            RepoError::Unavailable(_) | RepoError::TimedOut(_) => {
                tracing::warn!(error = %err, "database unavailable");
                Self::Unavailable("the database is unavailable; retry later".into())
            }
            RepoError::NotFound => Self::NotFound("not found".into()),
            RepoError::Missing(m) => Self::NotFound(m),
            RepoError::Conflict(m) => Self::Conflict(m),
            RepoError::Invalid(m) => Self::InvalidRequest(m),
            RepoError::Db(e) => Self::Internal(e.to_string()),
            RepoError::Invariant(e) => Self::Internal(e.to_string()),
        }
    }
}

impl From<IngestError> for ApiError {
    fn from(err: IngestError) -> Self {
        match err {
            IngestError::Overloaded => Self::Unavailable("ingest is overloaded; retry later".into()),
            IngestError::Unavailable => Self::Unavailable("the database is unavailable; retry later".into()),
            IngestError::Failed(cause) => Self::Internal(cause),
        }
    }
}

/// Routes JSON body errors into [`ApiError`].
pub fn json_error(err: JsonPayloadError, _req: &actix_web::HttpRequest) -> actix_web::Error {
    let api = match &err {
        JsonPayloadError::Overflow { limit } | JsonPayloadError::OverflowKnownLength { limit, .. } => {
            ApiError::PayloadTooLarge(format!("the request body exceeds {limit} bytes"))
        }
        JsonPayloadError::ContentType => {
            ApiError::InvalidRequest("the body must be JSON (Content-Type: application/json)".into())
        }
        JsonPayloadError::Deserialize(e) => ApiError::InvalidRequest(format!("invalid JSON body: {e}")),
        other => ApiError::InvalidRequest(format!("invalid body: {other}")),
    };
    api.into()
}

/// Routes query-string errors into [`ApiError`].
pub fn query_error(err: QueryPayloadError, _req: &actix_web::HttpRequest) -> actix_web::Error {
    ApiError::InvalidRequest(format!("invalid query string: {err}")).into()
}

/// Routes path errors into [`ApiError`]: a path that names nothing.
pub fn path_error(_err: PathError, _req: &actix_web::HttpRequest) -> actix_web::Error {
    ApiError::not_found("resource").into()
}
