//! Record batches v2: the produce validator (`validate_record_set`,
//! `validate`, `validate_records`), the header view, LogAppendTime stamping,
//! the idempotent-producer fields, the recovery scanners
//! (`scan_valid_prefix`, the segment scan `segment::scan_image`) and the
//! `__consumer_offsets` record reader.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    tidelog_fuzz::record_bytes(data);
});
