//! The controller quorum's files: `raft.log` through the scanner
//! `LogStore::open` runs (`tidelog_quorum::scan_metadata_log`: frame
//! lengths, CRCs, serde_json entries, index gaps), and the JSON files beside
//! it (`snapshot.json`'s ClusterImage, the metadata commands). The first byte
//! picks which.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tidelog_quorum::{ClusterImage, MetadataCommand};

fuzz_target!(|data: &[u8]| {
    let Some((&kind, rest)) = data.split_first() else { return };
    match kind % 3 {
        0 | 1 => {
            if let Ok(scan) = tidelog_quorum::scan_metadata_log(rest) {
                assert!(scan.end_bytes <= rest.len());
                assert_eq!(scan.torn_tail, scan.end_bytes < rest.len());
            }
        }
        _ => {
            let _ = serde_json::from_slice::<ClusterImage>(rest);
            let _ = serde_json::from_slice::<MetadataCommand>(rest);
        }
    }
});
