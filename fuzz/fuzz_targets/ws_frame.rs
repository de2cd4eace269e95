//! WebSocket text frames, as the session parses them (`parse_client_frame`),
//! then the message of an `ingest` frame through `validate::message`.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    // actix-ws hands the session text frames that are valid UTF-8 only.
    if let Ok(text) = std::str::from_utf8(data) {
        clusterd_fuzz::check_frame(text);
    }
});
