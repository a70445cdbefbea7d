//! What the embedded store reads back from disk: records, stats rows, blocks of raw
//! events and write-ahead-log batches, from any bytes (a damaged disk, a bug). No decoder
//! may panic, and a record that decodes must re-encode to the same record.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|bytes: &[u8]| {
    verigate::store::sled::fuzz_decoders(bytes);
});
