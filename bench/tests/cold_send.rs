//! tidelog-cold-send runs both ways end to end on a small file and checks
//! every byte that arrived (CRC against the file), so the comparison tool
//! keeps measuring correct sends.

use std::process::Command;

#[test]
fn both_ways_deliver_the_file_intact() {
    let dir = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("cold-send");
    for extra in [&[][..], &["--ahead", "3", "--force-async"][..]] {
        let out = Command::new(env!("CARGO_BIN_EXE_tidelog-cold-send"))
            .args(["--dir", dir.to_str().unwrap(), "--mib", "8", "--chunk-kib", "64"])
            .args(extra)
            .output()
            .unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success(), "{extra:?}: {}\n{stdout}", String::from_utf8_lossy(&out.stderr));
        assert!(stdout.contains("sendfile on a thread") && stdout.contains("io_uring splice"), "{stdout}");
        assert_eq!(stdout.matches("CRC ok").count(), 2, "{stdout}");
    }
    // The scratch file is gone.
    assert_eq!(std::fs::read_dir(&dir).unwrap().count(), 0);
}
