//! `POST /v1/messages` bodies, as bytes: JSON, the object check, the
//! message's shape, then `validate::message`.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| clusterd_fuzz::check_body(data));
