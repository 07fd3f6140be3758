//! A valid signed share (first byte: which of the fixed shares, with or
//! without row weights) with the rest of the input applied as edits to its
//! frame: an edited share is accepted only if its content is the original's.
//! The checks are `fd_protocol_fuzzing::check_share_mutation`, shared with
//! the stable replay test `protocol/tests/fuzz_corpus.rs`.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    fd_protocol_fuzzing::check_share_mutation(data);
});
