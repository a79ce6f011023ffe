//! A whole request frame (without its 4-byte length prefix): header, then
//! the body through `request::decode_request` (the broker's dispatch entry
//! point) for every API and version in the table, then Produce's validation
//! layer and JoinGroup's subscription parsing. Seeds are frames captured
//! from real clients (capture-corpus.py).
#![no_main]

use libfuzzer_sys::fuzz_target;
use tidelog_engine::storage::producer_state::ProducerStateTable;

fuzz_target!(|data: &[u8]| {
    let _ = tidelog_fuzz::request_frame(data, &mut ProducerStateTable::default());
});
