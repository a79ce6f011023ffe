//! LogAppendTime: stamping the broker's clock into produced batches of
//! topics with `message.timestamp.type=LogAppendTime`.
//!
//! Pure functions over a produce request's record set, run on the owning
//! shard just before the append. Kafka's rule for v2 batches: the batch's
//! max timestamp becomes the broker time and attribute bit 3 (timestamp type)
//! is set; records keep their deltas, and clients report every record of
//! such a batch with the batch's max timestamp. Both fields are under the
//! CRC, so the CRC is recomputed, for those batches only (CreateTime topics
//! are never touched, and a batch already stamped with `now` is left as is).
//!
//! ```text
//!  offset 17: crc u32 (crc32c of bytes 21..)   21: attributes i16 (bit 3 = LogAppendTime)
//!  offset 35: max timestamp i64
//! ```

use tidelog_protocol::batch::{BatchInfo, BATCH_HEADER_BYTES};

const CRC_AT: usize = 17;
const ATTRIBUTES_AT: usize = 21;
const MAX_TIMESTAMP_AT: usize = 35;
const LOG_APPEND_TIME_FLAG: i16 = 1 << 3;

/// Stamps `now_ms` into every batch of `records` (already validated, so
/// `infos` describes them in order) and updates `infos` to match. Returns
/// the number of batches rewritten.
pub fn stamp_log_append_time(records: &mut [u8], infos: &mut [BatchInfo], now_ms: i64) -> usize {
    let mut at = 0usize;
    let mut rewritten = 0;
    for info in infos.iter_mut() {
        let end = at + info.size_bytes;
        if end > records.len() || info.size_bytes < BATCH_HEADER_BYTES {
            debug_assert!(false, "batch infos do not match the record set ({end} > {})", records.len());
            break;
        }
        let b = &mut records[at..end];
        let attributes = i16::from_be_bytes([b[ATTRIBUTES_AT], b[ATTRIBUTES_AT + 1]]);
        let max_ts = i64::from_be_bytes(b[MAX_TIMESTAMP_AT..MAX_TIMESTAMP_AT + 8].try_into().unwrap_or([0; 8]));
        if attributes & LOG_APPEND_TIME_FLAG == 0 || max_ts != now_ms {
            b[ATTRIBUTES_AT..ATTRIBUTES_AT + 2].copy_from_slice(&(attributes | LOG_APPEND_TIME_FLAG).to_be_bytes());
            b[MAX_TIMESTAMP_AT..MAX_TIMESTAMP_AT + 8].copy_from_slice(&now_ms.to_be_bytes());
            let crc = crc32c::crc32c(&b[ATTRIBUTES_AT..]);
            b[CRC_AT..CRC_AT + 4].copy_from_slice(&crc.to_be_bytes());
            rewritten += 1;
        }
        info.max_timestamp_ms = now_ms;
        at = end;
    }
    rewritten
}

#[cfg(test)]
mod tests {
    use super::*;
    use tidelog_protocol::batch::{build_batch, validate, validate_record_set, BatchHeader, ProducerFields, RecordRef};

    #[test]
    fn stamps_time_and_flag_and_keeps_crc_valid() {
        let headers: &[(&[u8], Option<&[u8]>)] = &[(b"h", Some(b"v"))];
        let recs: Vec<RecordRef<'_>> = (0..4)
            .map(|i| RecordRef { key: Some(b"k"), value: Some(b"value"), headers, timestamp_delta_ms: i })
            .collect();
        let one = build_batch(&recs, 1_000, ProducerFields::default());
        let mut set = one.to_vec();
        set.extend_from_slice(&one);
        let original = set.clone();
        let mut infos = validate_record_set(&set, usize::MAX).unwrap();
        assert_eq!(infos[0].max_timestamp_ms, 1_003);
        assert_eq!(stamp_log_append_time(&mut set, &mut infos, 5_000), 2);
        let mut at = 0;
        for info in &infos {
            let checked = validate(&set[at..], usize::MAX).expect("CRC valid after the rewrite");
            assert_eq!(checked.max_timestamp_ms, 5_000);
            assert_eq!(info.max_timestamp_ms, 5_000);
            let h = BatchHeader::parse(&set[at..]).unwrap();
            assert!(h.is_log_append_time());
            assert_eq!(h.base_timestamp_ms(), 1_000);
            assert_eq!(h.record_count(), 4);
            // Records (and their headers) are byte-for-byte untouched.
            assert_eq!(
                &set[at + BATCH_HEADER_BYTES..at + info.size_bytes],
                &original[at + BATCH_HEADER_BYTES..at + info.size_bytes]
            );
            at += info.size_bytes;
        }
        // Stamping again with the same time is a no-op.
        assert_eq!(stamp_log_append_time(&mut set, &mut infos, 5_000), 0);
    }
}
