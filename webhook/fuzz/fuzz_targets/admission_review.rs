//! Arbitrary bytes as the body of `POST /inject`.

#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|body: &[u8]| {
    ferrimesh_webhook_fuzz::check::admission_review(body);
});
