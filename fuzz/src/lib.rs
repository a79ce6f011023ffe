//! Shared drivers of the fuzz targets (see README.md): each takes untrusted
//! bytes through the same functions the broker uses, and checks what must
//! hold for any input. A panic, an abort or an allocation past libFuzzer's
//! `-malloc_limit_mb` is a finding.

use bytes::Bytes;
use tidelog_engine::groups::records;
use tidelog_engine::handlers;
use tidelog_engine::storage::producer_state::ProducerStateTable;
use tidelog_protocol::batch;
use tidelog_protocol::header;
use tidelog_protocol::messages::ApiKey;
use tidelog_protocol::request::{decode_request, Request};

/// Largest record batch the produce path is given (the broker's default
/// `message.max.bytes`).
pub const MESSAGE_MAX_BYTES: usize = 1_048_588;

/// One request frame (after its length prefix) as the broker's connection
/// loop and dispatch see it: header, body, then for Produce the handler's
/// whole validation layer (frame cutting, batch and record checks,
/// LogAppendTime stamping, idempotent-producer checks against `producers`),
/// and for JoinGroup the subscription parsing the group coordinator does.
/// Returns the decoded request, or why the broker would close the connection.
pub fn request_frame(data: &[u8], producers: &mut ProducerStateTable) -> Result<Request, String> {
    let mut frame = Bytes::copy_from_slice(data);
    let (key, req_header) = header::decode_request_header(&mut frame).map_err(|e| e.to_string())?;
    let version = req_header.request_api_version;
    // As `handlers::route`: Produce takes the frame back after decoding.
    let produce_frame = (key == ApiKey::Produce).then(|| frame.clone());
    let decoded = decode_request(key, version, &mut frame);
    drop(frame);
    let req = decoded.map_err(|e| e.to_string())?;
    match &req {
        Request::Produce(p) => {
            let frame = produce_frame.unwrap_or_default();
            let stamp = (req_header.correlation_id & 1 == 1).then_some(1_700_000_000_000);
            let verdicts =
                handlers::produce_validate_only(version, p.clone(), frame, MESSAGE_MAX_BYTES, stamp, producers);
            let partitions: usize = p.topic_data.iter().map(|t| t.partition_data.len()).sum();
            assert_eq!(verdicts.len(), partitions, "one verdict per partition");
        }
        Request::JoinGroup(j) => {
            for p in &j.protocols {
                if let Some(topics) = records::subscription_topics(&p.metadata) {
                    assert!(topics.len() <= p.metadata.len());
                }
            }
        }
        _ => {}
    }
    Ok(req)
}

/// Everything that reads a record batch or a run of them: the produce
/// validator, the header view, the recovery scanners and the
/// `__consumer_offsets` reader. Checks the invariants they promise.
pub fn record_bytes(data: &[u8]) {
    if let Ok(h) = batch::BatchHeader::parse(data) {
        let _ = (h.base_offset(), h.size_bytes(), h.leader_epoch(), h.magic(), h.crc(), h.compression());
        let _ = (h.is_log_append_time(), h.is_transactional(), h.is_control(), h.last_offset_delta());
        let _ = (h.base_timestamp_ms(), h.max_timestamp_ms(), h.producer_id(), h.producer_epoch());
        let _ = (h.base_sequence(), h.record_count(), h.last_offset());
    }
    let _ = batch::validate(data, usize::MAX);
    let _ = batch::validate_records(data);
    if let Ok(mut infos) = batch::validate_record_set(data, MESSAGE_MAX_BYTES) {
        assert_eq!(infos.iter().map(|i| i.size_bytes).sum::<usize>(), data.len());
        let _ = tidelog_engine::storage::producer_state::idempotent_batch(data, &infos);
        // LogAppendTime stamping keeps a valid record set valid.
        let mut stamped = data.to_vec();
        tidelog_engine::storage::timestamps::stamp_log_append_time(&mut stamped, &mut infos, 1_700_000_000_000);
        let again = batch::validate_record_set(&stamped, MESSAGE_MAX_BYTES);
        assert!(again.is_ok(), "stamping broke a valid record set: {again:?}");
    }
    let _ = batch::control_record_type(data);
    // Legacy clients: any bytes as a producer's MessageSet (Produce v0-v2),
    // and whatever the log may hold down-converted for Fetch v0-v3. A
    // converted set must come out as one valid v2 batch.
    if let Ok(converted) = tidelog_engine::storage::legacy::message_set_to_v2(data, MESSAGE_MAX_BYTES) {
        let again = batch::validate_record_set(&converted, usize::MAX);
        assert!(again.is_ok(), "a converted message set is not a valid batch: {again:?}");
    }
    for magic in [0, 1] {
        let out = tidelog_engine::storage::legacy::down_convert(data, magic, 0, 1 << 16, true, &[(1, 0)]);
        assert!(tidelog_protocol::legacy::parse_message_set(&out).is_ok(), "down-conversion wrote a bad set");
    }
    let (valid, found) = batch::scan_valid_prefix(data);
    assert!(valid <= data.len());
    assert_eq!(found.iter().map(|(_, i, _)| i.size_bytes).sum::<usize>(), valid);
    // Producer state replays whatever recovery accepts (transaction markers
    // included), and its snapshot reads back.
    let mut table = ProducerStateTable::default();
    for (at, _, _) in &found {
        if let Ok(h) = batch::BatchHeader::parse(&data[*at..]) {
            table.replay(&h);
        }
    }
    let snapshot = table.encode_snapshot(tidelog_protocol::Offset(valid as i64));
    assert!(ProducerStateTable::decode_snapshot(&snapshot).is_some(), "a snapshot did not read back");
    let (report, _next, index) = tidelog_engine::storage::segment::scan_image(data, tidelog_protocol::Offset(0), 4096);
    assert!(report.valid_bytes <= data.len() as u64);
    assert!(report.batches <= found.len(), "recovery accepted a batch the validator refuses");
    if let Some(decoded) =
        tidelog_engine::storage::index::SegmentIndex::decode(&index.encode_offsets(), &index.encode_times(), u64::MAX)
    {
        assert_eq!(decoded.offsets, index.offsets);
    }
    let _ = records::for_each_record(data, |k, v| {
        let _ = records::decode(k, v);
    });
}

#[cfg(test)]
mod tests {
    /// Every committed request seed goes through the broker's decoding and
    /// Produce validation (legacy versions included) without a panic.
    #[test]
    fn request_seeds_replay() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("seeds/request");
        let mut decoded = 0;
        let mut producers = super::ProducerStateTable::default();
        for entry in std::fs::read_dir(&dir).expect("seeds/request") {
            let data = std::fs::read(entry.expect("entry").path()).expect("read seed");
            decoded += usize::from(super::request_frame(&data, &mut producers).is_ok());
        }
        assert!(decoded > 0);
    }

    /// A few thousand corruptions (bit flips, truncations, lying lengths)
    /// of each legacy request seed through request_frame and the record
    /// readers: no panic. A stand-in between libFuzzer runs.
    #[test]
    fn corrupted_legacy_seeds_do_not_panic() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("seeds/request");
        let mut state = 0x9e37_79b9_7f4a_7c15u64;
        let mut next = move || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        let mut producers = super::ProducerStateTable::default();
        for entry in std::fs::read_dir(&dir).expect("seeds/request") {
            let seed = std::fs::read(entry.expect("entry").path()).expect("read seed");
            // Request header v1: api key, version (legacy: below the modern minimum).
            let (key, version) = (i16::from_be_bytes([seed[0], seed[1]]), i16::from_be_bytes([seed[2], seed[3]]));
            let legacy = matches!((key, version), (0, 0..=2) | (1, 0..=3) | (2, 0) | (8, 0..=1) | (9, 0));
            if !legacy {
                continue;
            }
            for _ in 0..3000 {
                let mut data = seed.clone();
                for _ in 0..(next() % 4 + 1) {
                    let at = (next() as usize) % data.len();
                    match next() % 3 {
                        0 => data[at] ^= 1 << (next() % 8),
                        1 => data[at] = next() as u8,
                        _ => data.truncate(at.max(4)),
                    }
                }
                let _ = super::request_frame(&data, &mut producers);
                super::record_bytes(&data[4.min(data.len())..]);
            }
        }
    }
}
