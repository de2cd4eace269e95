//! Validation of everything a client sends, before anything is stored.
//! A message that passes becomes a [`NewMessage`], ready to insert.

use chrono::{DateTime, Datelike, SubsecRound, Timelike, Utc};
use uuid::Uuid;

use crate::{
    domain::text,
    protocol::{MessageInput, Visitor},
    settings::Limits,
};

pub const MAX_CREATOR_ID_CHARS: usize = 128;
pub const MAX_EXTERNAL_ID_CHARS: usize = 256;
pub const MAX_VISITOR_ID_CHARS: usize = 256;
pub const MAX_VISITOR_NAME_CHARS: usize = 256;
pub const MAX_AVATAR_URL_CHARS: usize = 2048;
pub const MAX_RAW_PAYLOAD_BYTES: usize = 64 * 1024;
pub const MAX_RAW_PAYLOAD_DEPTH: usize = 32;
pub const MAX_MERGE_SOURCES: usize = 100;

/// Why an input was refused: the API maps `TooLarge` to 413 and `Invalid`
/// to 400.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ValidationError {
    #[error("{0}")]
    Invalid(String),
    #[error("{0}")]
    TooLarge(String),
}

fn invalid(msg: impl Into<String>) -> ValidationError {
    ValidationError::Invalid(msg.into())
}

/// A validated message, with its id and receive time assigned.
#[derive(Debug, Clone)]
pub struct NewMessage {
    pub id: Uuid,
    pub creator_id: String,
    pub external_id: Option<String>,
    pub text: String,
    pub norm_key: [u8; 32],
    pub visitor: Option<Visitor>,
    pub raw_payload: Option<serde_json::Value>,
    pub sent_at: DateTime<Utc>,
    pub received_at: DateTime<Utc>,
}

/// `creator_id`: 1-128 characters of `[A-Za-z0-9_.:-]`.
pub fn creator_id(id: &str) -> Result<(), ValidationError> {
    let valid_char = |c: char| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | ':' | '-');
    if id.is_empty() || id.len() > MAX_CREATOR_ID_CHARS || !id.chars().all(valid_char) {
        return Err(invalid(format!("creator_id must be 1-{MAX_CREATOR_ID_CHARS} characters of [A-Za-z0-9_.:-]")));
    }
    Ok(())
}

/// A free-text field: at most `max` characters, no NUL, and (when
/// `require_content`) at least one non-whitespace character.
fn text_field(name: &str, value: &str, max: usize, require_content: bool) -> Result<(), ValidationError> {
    if value.contains('\0') {
        return Err(invalid(format!("{name} must not contain NUL characters")));
    }
    if require_content && value.trim().is_empty() {
        return Err(invalid(format!("{name} must contain a non-whitespace character")));
    }
    let chars = value.chars().count();
    if chars > max {
        return Err(ValidationError::TooLarge(format!(
            "{name} is {chars} characters long; at most {max} are accepted"
        )));
    }
    Ok(())
}

/// The text of a message or of a response.
pub fn message_text(name: &str, value: &str, limits: &Limits) -> Result<(), ValidationError> {
    text_field(name, value, limits.max_text_chars, true)
}

fn short_field(name: &str, value: &str, max: usize) -> Result<(), ValidationError> {
    if value.is_empty() {
        return Err(invalid(format!("{name} must not be empty")));
    }
    if value.chars().count() > max {
        return Err(invalid(format!("{name} must be at most {max} characters")));
    }
    if value.chars().any(char::is_control) {
        return Err(invalid(format!("{name} must not contain control characters")));
    }
    Ok(())
}

/// `visitor.avatar_url`: an absolute `http` or `https` URL with a host, and
/// no whitespace or control characters. Dashboards show it as an image: a
/// `javascript:` or `data:` URL has no business there.
///
/// The `url` crate parses it; two things it forgives are refused on top:
/// whitespace and control characters (the WHATWG parser strips tabs and
/// newlines), and slashes where the host should be (`https:///a` parses
/// with host `a`).
fn avatar_url(text: &str) -> Result<(), ValidationError> {
    let web = url::Url::parse(text).is_ok_and(|u| matches!(u.scheme(), "http" | "https") && u.has_host());
    let host_first = text.split_once("://").is_some_and(|(_, rest)| !rest.starts_with('/'));
    if !web || !host_first || text.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err(invalid(
            "visitor.avatar_url must be an absolute http or https URL, without whitespace or control characters",
        ));
    }
    Ok(())
}

/// The list of clusters to merge into `target`: 1 to 100 ids, no id twice,
/// not the target itself. Ids compare as UUIDs where they parse (so case
/// does not hide a duplicate); whether each names a cluster is for the
/// caller to find out.
pub fn merge_sources(target: &str, ids: &[String]) -> Result<(), ValidationError> {
    if ids.is_empty() || ids.len() > MAX_MERGE_SOURCES {
        return Err(invalid(format!(
            "cluster_ids must hold 1 to {MAX_MERGE_SOURCES} cluster ids; it holds {}",
            ids.len()
        )));
    }
    let key = |id: &str| id.parse::<Uuid>().map_or_else(|_| id.to_owned(), |u| u.to_string());
    let target = key(target);
    let mut seen = std::collections::HashSet::with_capacity(ids.len());
    for id in ids {
        let k = key(id);
        if k == target {
            return Err(invalid(format!("cluster_ids must not contain the target cluster {id}")));
        }
        if !seen.insert(k) {
            return Err(invalid(format!("cluster_ids holds {id} twice")));
        }
    }
    Ok(())
}

/// Walks a JSON value: bounded depth, and no NUL in strings or keys
/// (PostgreSQL's jsonb cannot store `\u0000`).
fn raw_payload(value: &serde_json::Value) -> Result<(), ValidationError> {
    fn walk(v: &serde_json::Value, depth: usize) -> Result<(), ValidationError> {
        if depth > MAX_RAW_PAYLOAD_DEPTH {
            return Err(invalid(format!("raw_payload is nested deeper than {MAX_RAW_PAYLOAD_DEPTH} levels")));
        }
        let nul = || invalid("raw_payload must not contain NUL characters (\\u0000)");
        match v {
            serde_json::Value::String(s) if s.contains('\0') => Err(nul()),
            serde_json::Value::Array(items) => items.iter().try_for_each(|i| walk(i, depth + 1)),
            serde_json::Value::Object(map) => map.iter().try_for_each(|(k, i)| {
                if k.contains('\0') {
                    return Err(nul());
                }
                walk(i, depth + 1)
            }),
            _ => Ok(()),
        }
    }
    walk(value, 0)?;
    let size = serde_json::to_vec(value).map(|v| v.len()).unwrap_or(usize::MAX);
    if size > MAX_RAW_PAYLOAD_BYTES {
        return Err(ValidationError::TooLarge(format!(
            "raw_payload is {size} bytes; at most {MAX_RAW_PAYLOAD_BYTES} are accepted"
        )));
    }
    Ok(())
}

/// `sent_at`: an RFC 3339 timestamp, kept as the instant it names in UTC,
/// to the microsecond (PostgreSQL's precision: finer digits are dropped
/// here, so that every answer shows what is stored). Refused: a leap second
/// (`23:59:60`, which PostgreSQL would store as the next second) and an
/// instant outside years 1-9999 UTC (not writable back as RFC 3339).
pub fn sent_at(value: &str) -> Result<DateTime<Utc>, ValidationError> {
    let parsed = DateTime::parse_from_rfc3339(value)
        .map_err(|e| invalid(format!("sent_at must be an RFC 3339 timestamp: {e}")))?
        .with_timezone(&Utc);
    if parsed.nanosecond() >= 1_000_000_000 {
        return Err(invalid("sent_at must not be a leap second (:60)"));
    }
    if !(1..=9999).contains(&parsed.year()) {
        return Err(invalid("sent_at must fall within the years 0001-9999 UTC"));
    }
    Ok(parsed.trunc_subsecs(6))
}

/// Validates a submitted message and turns it into a [`NewMessage`].
pub fn message(input: MessageInput, limits: &Limits, now: DateTime<Utc>) -> Result<NewMessage, ValidationError> {
    creator_id(&input.creator_id)?;
    message_text("text", &input.text, limits)?;
    if let Some(external_id) = &input.external_id {
        short_field("external_id", external_id, MAX_EXTERNAL_ID_CHARS)?;
    }
    if let Some(visitor) = &input.visitor {
        let fields = [
            ("visitor.id", &visitor.id, MAX_VISITOR_ID_CHARS),
            ("visitor.name", &visitor.name, MAX_VISITOR_NAME_CHARS),
            ("visitor.avatar_url", &visitor.avatar_url, MAX_AVATAR_URL_CHARS),
        ];
        for (name, value, max) in fields {
            if let Some(value) = value {
                text_field(name, value, max, false).map_err(|e| invalid(e.to_string()))?;
            }
        }
        if let Some(url) = &visitor.avatar_url {
            avatar_url(url)?;
        }
    }
    if let Some(payload) = &input.raw_payload {
        raw_payload(payload)?;
    }
    let sent_at = match &input.sent_at {
        None => now,
        Some(s) => sent_at(s)?,
    };
    Ok(NewMessage {
        id: Uuid::now_v7(),
        norm_key: text::norm_key(&input.text),
        creator_id: input.creator_id,
        external_id: input.external_id,
        text: input.text,
        visitor: input.visitor.filter(|v| *v != Visitor::default()),
        raw_payload: input.raw_payload,
        sent_at,
        received_at: now,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits() -> Limits {
        Limits { max_text_chars: 10, max_body_bytes: 1 << 20, max_frame_bytes: 1 << 16, max_batch: 10 }
    }

    fn input(text: &str) -> MessageInput {
        MessageInput {
            creator_id: "creator-1".into(),
            text: text.into(),
            external_id: None,
            visitor: None,
            raw_payload: None,
            sent_at: None,
        }
    }

    fn check(i: MessageInput) -> Result<NewMessage, ValidationError> {
        message(i, &limits(), Utc::now())
    }

    #[test]
    fn merge_source_lists() {
        let target = "0199a5c4-7e5f-7b1a-9d0e-3f2a1b4c5d6e";
        let other = "0199a5c4-7e5f-7b1a-9d0e-3f2a1b4c5d6f";
        let ids = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        assert!(merge_sources(target, &ids(&[other])).is_ok());
        assert!(merge_sources(target, &ids(&[other, "not-an-id"])).is_ok(), "existence is the caller's");
        assert!(merge_sources(target, &[]).is_err());
        assert!(merge_sources(target, &ids(&[other, other])).is_err());
        assert!(merge_sources(target, &ids(&[other, &other.to_uppercase()])).is_err(), "the same UUID");
        assert!(merge_sources(target, &ids(&["x", "x"])).is_err());
        assert!(merge_sources(target, &ids(&[&target.to_uppercase()])).is_err(), "the target itself");
        let many: Vec<String> = (0..=MAX_MERGE_SOURCES).map(|_| Uuid::now_v7().to_string()).collect();
        assert!(merge_sources(target, &many[..MAX_MERGE_SOURCES]).is_ok());
        assert!(merge_sources(target, &many).is_err());
    }

    #[test]
    fn creator_ids() {
        assert!(creator_id("abc_DEF.1:2-3").is_ok());
        assert!(creator_id("").is_err());
        assert!(creator_id("a b").is_err());
        assert!(creator_id("é").is_err());
        assert!(creator_id(&"a".repeat(128)).is_ok());
        assert!(creator_id(&"a".repeat(129)).is_err());
    }

    #[test]
    fn text_limits_count_characters_not_bytes() {
        assert!(check(input("éééééééééé")).is_ok(), "10 characters, 20 bytes");
        assert!(matches!(check(input("01234567890")), Err(ValidationError::TooLarge(_))));
        assert!(matches!(check(input("")), Err(ValidationError::Invalid(_))));
        assert!(matches!(check(input(" \n\t ")), Err(ValidationError::Invalid(_))));
        assert!(matches!(check(input("a\0b")), Err(ValidationError::Invalid(_))));
    }

    #[test]
    fn text_is_kept_as_sent() {
        let m = check(input("  Hi! ")).expect("valid");
        assert_eq!(m.text, "  Hi! ");
        assert_eq!(m.norm_key, text::norm_key("hi!"));
    }

    #[test]
    fn sent_at_is_an_instant_to_the_microsecond_within_years_1_to_9999() {
        let utc = |s: &str| sent_at(s).map(|t| t.to_rfc3339_opts(chrono::SecondsFormat::AutoSi, true));
        assert_eq!(utc("2026-11-25T10:00:00+01:00"), Ok("2026-11-25T09:00:00Z".into()));
        assert_eq!(utc("2026-11-25T10:00:00.123456789Z"), Ok("2026-11-25T10:00:00.123456Z".into()));
        assert_eq!(utc("9999-12-31T23:59:59.999999Z"), Ok("9999-12-31T23:59:59.999999Z".into()));
        assert_eq!(utc("0001-01-01T00:00:00Z"), Ok("0001-01-01T00:00:00Z".into()));
        for refused in [
            "2016-12-31T23:59:60Z",
            "0000-12-31T00:00:00Z",
            "0001-01-01T00:00:00+00:01",
            "9999-12-31T23:59:59-00:01",
            "2026-11-25T10:00:00",
            "2026-11-25",
            "",
        ] {
            assert!(sent_at(refused).is_err(), "{refused}");
        }
    }

    #[test]
    fn avatar_urls_are_http_or_https() {
        for ok in ["https://cdn.example.com/a.png?s=64", "HTTP://x", "http://[::1]:8080/a"] {
            assert_eq!(avatar_url(ok), Ok(()), "{ok}");
        }
        for refused in [
            "",
            "javascript:alert(1)",
            "data:image/png;base64,AA",
            "https://",
            "https:///a",
            "//x/a.png",
            "https://a b",
            "https://a\u{7}",
            "ftp://x",
            "https:/a",
            "https:\\\\a",
        ] {
            assert!(avatar_url(refused).is_err(), "{refused}");
        }
    }

    #[test]
    fn optional_fields() {
        let mut i = input("hi");
        i.external_id = Some(String::new());
        assert!(check(i).is_err());
        let mut i = input("hi");
        i.external_id = Some("a\u{7}".into());
        assert!(check(i).is_err());
        let mut i = input("hi");
        i.sent_at = Some("yesterday".into());
        assert!(check(i).is_err());
        let mut i = input("hi");
        i.sent_at = Some("2026-11-25T10:00:00+01:00".into());
        assert_eq!(check(i).expect("valid").sent_at.to_rfc3339(), "2026-11-25T09:00:00+00:00");
        let mut i = input("hi");
        i.raw_payload = Some(serde_json::json!({"a": ["x\u{0}"]}));
        assert!(check(i).is_err());
        let mut i = input("hi");
        let mut deep = serde_json::json!(1);
        for _ in 0..40 {
            deep = serde_json::json!([deep]);
        }
        i.raw_payload = Some(deep);
        assert!(check(i).is_err());
        let mut i = input("hi");
        i.visitor = Some(Visitor { name: Some("n\0".into()), ..Visitor::default() });
        assert!(check(i).is_err());
    }
}
