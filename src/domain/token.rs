//! API tokens: what they grant, how they are made, and the hash that is
//! all the database keeps of them.
//!
//! A token is `cd_` followed by 32 random bytes in URL-safe base64: 256 bits
//! from the operating system's generator, so a plain SHA-256 is enough to
//! store it (a slow password hash only helps secrets that can be guessed).

use std::{fmt, str::FromStr};

use base64::{Engine, engine::general_purpose::URL_SAFE_NO_PAD};
use rand::RngCore;
use sha2::{Digest, Sha256};

use super::validate;

const PREFIX: &str = "cd_";
const SECRET_BYTES: usize = 32;

/// What a token may do.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Scope {
    /// Send messages, for any creator (chat integrations), and read the
    /// messages by id.
    Ingest,
    /// Read, subscribe to and act on one creator's clusters (a dashboard).
    Creator(String),
    /// Everything, including the operator endpoints and `/metrics`.
    Admin,
}

impl Scope {
    /// The `scope` column: `ingest`, `creator` or `admin`.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::Ingest => "ingest",
            Self::Creator(_) => "creator",
            Self::Admin => "admin",
        }
    }

    pub fn creator_id(&self) -> Option<&str> {
        match self {
            Self::Creator(id) => Some(id),
            _ => None,
        }
    }

    /// Rebuilds a scope from its stored columns.
    pub fn from_columns(kind: &str, creator_id: Option<String>) -> Option<Self> {
        match (kind, creator_id) {
            ("ingest", None) => Some(Self::Ingest),
            ("admin", None) => Some(Self::Admin),
            ("creator", Some(id)) => Some(Self::Creator(id)),
            _ => None,
        }
    }
}

/// `ingest`, `admin` or `creator:<id>`.
impl fmt::Display for Scope {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Creator(id) => write!(f, "creator:{id}"),
            other => f.write_str(other.kind()),
        }
    }
}

impl FromStr for Scope {
    type Err = validate::ValidationError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "ingest" => Ok(Self::Ingest),
            "admin" => Ok(Self::Admin),
            _ => match s.strip_prefix("creator:") {
                Some(id) => validate::creator_id(id).map(|()| Self::Creator(id.to_owned())),
                None => Err(validate::ValidationError::Invalid(format!(
                    "a scope is ingest, admin or creator:<creator_id>, not {s:?}"
                ))),
            },
        }
    }
}

/// The stored form of a token.
pub type TokenHash = [u8; 32];

pub fn hash(token: &str) -> TokenHash {
    Sha256::digest(token.as_bytes()).into()
}

/// A new random token and its hash.
pub fn generate() -> (String, TokenHash) {
    let mut secret = [0u8; SECRET_BYTES];
    rand::rng().fill_bytes(&mut secret);
    let token = format!("{PREFIX}{}", URL_SAFE_NO_PAD.encode(secret));
    let hash = hash(&token);
    (token, hash)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scopes_print_and_parse_back() {
        for scope in [Scope::Ingest, Scope::Admin, Scope::Creator("shop-1.eu:x_y".into())] {
            assert_eq!(scope.to_string().parse::<Scope>(), Ok(scope.clone()));
            assert_eq!(Scope::from_columns(scope.kind(), scope.creator_id().map(str::to_owned)), Some(scope));
        }
        for bad in ["", "root", "creator:", "creator:a b", "Admin", "ingest "] {
            assert!(bad.parse::<Scope>().is_err(), "{bad:?} parsed");
        }
        assert_eq!(Scope::from_columns("creator", None), None);
        assert_eq!(Scope::from_columns("ingest", Some("x".into())), None);
    }

    #[test]
    fn tokens_are_random_and_hashed() {
        let (a, hash_a) = generate();
        let (b, hash_b) = generate();
        assert_ne!(a, b);
        assert_ne!(hash_a, hash_b);
        assert!(a.starts_with(PREFIX));
        assert_eq!(a.len(), PREFIX.len() + 43);
        assert_eq!(hash(&a), hash_a);
        assert!(a[PREFIX.len()..].bytes().all(|c| c.is_ascii_alphanumeric() || c == b'-' || c == b'_'));
    }
}
