//! The properties the fuzz targets check, on the functions the server uses
//! to parse and validate what clients send.

use chrono::{DateTime, SubsecRound, TimeZone, Utc};
use clusterd::{
    domain::{
        text,
        validate::{self, ValidationError},
    },
    protocol::{self, ClientFrame, MessageInput, Visitor},
    settings::Limits,
};
use serde_json::Value;

/// Small limits, so that the fuzzer reaches them often.
pub fn limits() -> Limits {
    Limits { max_text_chars: 64, max_body_bytes: 1 << 20, max_frame_bytes: 1 << 16, max_batch: 10 }
}

/// A fixed receive time: a run is reproducible.
fn now() -> DateTime<Utc> {
    Utc.with_ymd_and_hms(2026, 11, 26, 8, 0, 0).single().expect("a valid instant").trunc_subsecs(6)
}

/// Checks one WebSocket text frame: a refusal says why (and echoes only a
/// string or number `id`); an accepted frame serialises back to a frame
/// that parses to the same thing; an ingested message is then validated.
pub fn check_frame(text: &str) {
    match protocol::parse_client_frame(text) {
        Err(e) => {
            assert!(!e.message.is_empty());
            assert!(e.id.as_ref().is_none_or(|id| id.is_string() || id.is_number()), "{e:?}");
        }
        Ok(frame) => {
            let json = serde_json::to_string(&frame).expect("a parsed frame serialises");
            let again = protocol::parse_client_frame(&json).unwrap_or_else(|e| panic!("{json} does not parse: {e:?}"));
            assert_eq!(serde_json::to_string(&again).expect("serialises"), json, "the frame round-trips");
            if let ClientFrame::Ingest { message, .. } = frame {
                check_message(message);
            }
        }
    }
}

/// Checks one request body of `POST /v1/messages`, as bytes.
pub fn check_body(bytes: &[u8]) {
    let Ok(value) = serde_json::from_slice::<Value>(bytes) else { return };
    let Ok(input) = protocol::from_object::<MessageInput>(value) else { return };
    let json = serde_json::to_value(&input).expect("a parsed message serialises");
    let again: MessageInput = protocol::from_object(json.clone()).expect("a serialised message parses");
    assert_eq!(serde_json::to_value(&again).expect("serialises"), json, "the message round-trips");
    check_message(input);
}

/// Validates a message; what passes is what was sent (the text to the
/// byte), within the documented limits, and storable in PostgreSQL (no
/// NUL, `sent_at` to the microsecond within years 1-9999).
pub fn check_message(input: MessageInput) {
    let limits = limits();
    let sent = input.clone();
    let message = match validate::message(input, &limits, now()) {
        Err(ValidationError::Invalid(m) | ValidationError::TooLarge(m)) => {
            assert!(!m.is_empty());
            return;
        }
        Ok(message) => message,
    };
    let creator_char = |c: char| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | ':' | '-');
    assert_eq!(message.creator_id, sent.creator_id);
    assert!((1..=validate::MAX_CREATOR_ID_CHARS).contains(&message.creator_id.len()));
    assert!(message.creator_id.chars().all(creator_char), "{:?}", message.creator_id);

    assert_eq!(message.text, sent.text, "the text is kept as sent");
    assert!((1..=limits.max_text_chars).contains(&message.text.chars().count()));
    assert!(!message.text.trim().is_empty() && !message.text.contains('\0'), "{:?}", message.text);
    assert_eq!(message.norm_key, text::norm_key(&sent.text));

    assert_eq!(message.external_id, sent.external_id);
    if let Some(id) = &message.external_id {
        assert!((1..=validate::MAX_EXTERNAL_ID_CHARS).contains(&id.chars().count()));
        assert!(!id.chars().any(char::is_control), "{id:?}");
    }

    let expected_visitor = sent.visitor.clone().filter(|v| *v != Visitor::default());
    assert_eq!(message.visitor, expected_visitor, "the visitor is kept as sent");
    if let Some(v) = &message.visitor {
        let fields = [
            (&v.id, validate::MAX_VISITOR_ID_CHARS),
            (&v.name, validate::MAX_VISITOR_NAME_CHARS),
            (&v.avatar_url, validate::MAX_AVATAR_URL_CHARS),
        ];
        for (value, max) in fields {
            if let Some(value) = value {
                assert!(value.chars().count() <= max && !value.contains('\0'), "{value:?}");
            }
        }
    }

    assert_eq!(message.raw_payload, sent.raw_payload, "raw_payload is kept as sent");
    if let Some(payload) = &message.raw_payload {
        assert!(depth(payload) <= validate::MAX_RAW_PAYLOAD_DEPTH, "{payload}");
        assert!(!has_nul(payload), "{payload}");
        let size = serde_json::to_vec(payload).expect("serialises").len();
        assert!(size <= validate::MAX_RAW_PAYLOAD_BYTES);
    }

    match &sent.sent_at {
        None => assert_eq!(message.sent_at, now()),
        Some(s) => {
            let parsed = DateTime::parse_from_rfc3339(s).expect("an accepted sent_at parses");
            assert_eq!(message.sent_at, parsed.with_timezone(&Utc).trunc_subsecs(6));
        }
    }
    assert_eq!(message.sent_at.timestamp_subsec_nanos() % 1000, 0, "to the microsecond");
    let printed = message.sent_at.to_rfc3339_opts(chrono::SecondsFormat::AutoSi, true);
    assert_eq!(DateTime::parse_from_rfc3339(&printed).map(|t| t.with_timezone(&Utc)), Ok(message.sent_at), "{printed}");
    assert_eq!(message.received_at, now());
}

/// The depth of the deepest value inside, the outermost at 0 (as
/// `validate` counts it: an empty array adds no level).
fn depth(value: &Value) -> usize {
    let below = |d: usize| d + 1;
    match value {
        Value::Array(items) => items.iter().map(depth).map(below).max().unwrap_or(0),
        Value::Object(map) => map.values().map(depth).map(below).max().unwrap_or(0),
        _ => 0,
    }
}

fn has_nul(value: &Value) -> bool {
    match value {
        Value::String(s) => s.contains('\0'),
        Value::Array(items) => items.iter().any(has_nul),
        Value::Object(map) => map.iter().any(|(k, v)| k.contains('\0') || has_nul(v)),
        _ => false,
    }
}
