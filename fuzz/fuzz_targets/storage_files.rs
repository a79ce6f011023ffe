//! The files the broker reads back on start, each through the same decoder
//! recovery uses. The first byte picks the file kind; the rest is its
//! content:
//!
//! 0: a segment (`.log`) through recovery's scan (`segment::scan_image`)
//! 1: `.index` + `.timeindex` (`SegmentIndex::decode`, then lookups on it)
//! 2: `leader-epoch-checkpoint` (`epochs::decode`, then the cache built from it)
//! 3: a producer state snapshot (`ProducerStateTable::decode_snapshot`)
//! 4: a `__consumer_offsets` record key and value (`groups::records::decode`)
//! 5: `tidelog-metadata.json` (`MetadataImage`, as `MetadataImage::load`)
#![no_main]

use libfuzzer_sys::fuzz_target;
use tidelog_engine::metadata::MetadataImage;
use tidelog_engine::storage::epochs::{self, LeaderEpochCache};
use tidelog_engine::storage::index::SegmentIndex;
use tidelog_engine::storage::producer_state::ProducerStateTable;
use tidelog_engine::storage::segment;
use tidelog_protocol::{Epoch, Offset};

fn split(data: &[u8]) -> (&[u8], &[u8]) {
    let Some((&at, rest)) = data.split_first() else { return (&[], &[]) };
    let at = (at as usize * rest.len() / 255).min(rest.len());
    rest.split_at(at)
}

fn u64_at(data: &[u8]) -> u64 {
    let mut b = [0u8; 8];
    let n = data.len().min(8);
    b[..n].copy_from_slice(&data[..n]);
    u64::from_be_bytes(b)
}

fuzz_target!(|data: &[u8]| {
    let Some((&kind, data)) = data.split_first() else { return };
    match kind % 6 {
        0 => {
            let base = Offset((u64_at(data) >> 1) as i64 & 0xffff_ffff);
            let (report, next, index) = segment::scan_image(data, base, 4096);
            assert!(report.valid_bytes <= data.len() as u64);
            assert!(next >= base);
            let back = SegmentIndex::decode(&index.encode_offsets(), &index.encode_times(), report.valid_bytes);
            if report.valid_bytes > 0 {
                assert!(back.is_some(), "recovery built an index its own decoder refuses");
            }
        }
        1 => {
            let log_bytes = u64_at(data);
            let (offsets, times) = split(data.get(8..).unwrap_or(&[]));
            if let Some(mut index) = SegmentIndex::decode(offsets, times, log_bytes) {
                assert_eq!(index.encode_offsets(), offsets);
                assert_eq!(index.encode_times(), times);
                let target = Offset(log_bytes as i64);
                let _ = index.position_for(Offset(0), target);
                let _ = index.position_for(Offset(i64::MAX), Offset(i64::MIN));
                let _ = index.offset_for_time(log_bytes as i64);
                index.truncate(log_bytes as u32, log_bytes >> 32);
            }
        }
        2 => {
            let Ok(text) = std::str::from_utf8(data) else { return };
            if let Ok(entries) = epochs::decode(text) {
                assert_eq!(epochs::decode(&epochs::encode(&entries)).as_ref(), Ok(&entries));
                let mut cache = LeaderEpochCache::from_entries(entries);
                let end = Offset(data.len() as i64 * 1000);
                for e in [0, 1, 7, i32::MAX] {
                    let _ = cache.end_offset_for(Epoch(e), end);
                    let _ = cache.is_newer(Epoch(e));
                }
                cache.truncate_from_end(Offset(data.len() as i64));
                cache.truncate_from_start(Offset(3));
                cache.assign(Epoch(i32::MAX), end);
            }
        }
        3 => {
            if let Some((table, covered_to)) = ProducerStateTable::decode_snapshot(data) {
                let again = table.encode_snapshot(covered_to);
                let (table2, covered2) =
                    ProducerStateTable::decode_snapshot(&again).expect("re-encoded snapshot decodes");
                assert_eq!(covered2, covered_to);
                assert_eq!(table2.len(), table.len());
            }
        }
        4 => {
            let (key, value) = split(data);
            let _ = tidelog_engine::groups::records::decode(key, Some(value));
            let _ = tidelog_engine::groups::records::decode(key, None);
        }
        _ => {
            let _ = serde_json::from_slice::<MetadataImage>(data);
        }
    }
});
