//! Arbitrary bytes as a received frame: decode, round trip, and for a share
//! the validation gate and the payload decoders. The checks are
//! `fd_protocol_fuzzing::check_decode`, shared with the stable replay test
//! `protocol/tests/fuzz_corpus.rs`.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    fd_protocol_fuzzing::check_decode(data);
});
