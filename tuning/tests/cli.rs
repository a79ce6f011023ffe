//! The tidelog-tune binary as an operator runs it: help text, argument
//! errors, iotune's refusals and a short real iotune run.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;
use common::*;

#[test]
fn help_explains_every_flag() {
    let top = stdout(&run(&["--help"]));
    for cmd in ["check", "apply", "iotune"] {
        assert!(top.contains(&format!("\n  {cmd} ")), "{cmd} missing from:\n{top}");
    }
    assert!(top.contains("linux-only.md"));
    let check = stdout(&run(&["check", "--help"]));
    for flag in ["--root <DIR>", "--dir <DATA_DIR>", "--config <FILE>", "--shards <N>", "--json"] {
        assert!(check.contains(flag), "{flag} missing from:\n{check}");
    }
    let apply = stdout(&run(&["apply", "--help"]));
    for flag in
        ["--root <DIR>", "--dir <DATA_DIR>", "--config <FILE>", "--shards <N>", "--dry-run", "--yes", "--persist <DIR>"]
    {
        assert!(apply.contains(flag), "{flag} missing from:\n{apply}");
    }
    let iotune = stdout(&run(&["iotune", "--help"]));
    for flag in ["--dir <DIR>", "--out <FILE>", "--duration-s <N>", "[default: 12]"] {
        assert!(iotune.contains(flag), "{flag} missing from:\n{iotune}");
    }
}

#[test]
fn conflicting_and_bad_arguments_are_usage_errors() {
    let out = run(&["apply", "--dry-run", "--yes"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(stderr(&out).contains("the argument '--dry-run' cannot be used with '--yes'"), "{}", stderr(&out));
    let out = run(&["check", "--dir", "/a", "--config", "/b"]);
    assert_eq!(out.status.code(), Some(2));
    let out = run(&["check", "--shards", "0"]);
    assert_eq!(out.status.code(), Some(2));
    let out = run(&["iotune"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(stderr(&out).contains("--dir <DIR>"));
}

#[test]
fn a_bad_config_is_reported_not_panicked_on() {
    let dir = TempDir::new("cfg");
    let cfg = dir.path().join("server.properties");
    std::fs::write(&cfg, "num.shards=lots\n").unwrap();
    let out = run(&["check", "--root", dir.path().to_str().unwrap(), "--config", cfg.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(2));
    assert_eq!(
        stderr(&out),
        format!(
            "tidelog-tune: error: parsing config {}: line 1: num.shards must be a non-negative integer, got \"lots\"\n",
            cfg.display()
        )
    );
    let out = run(&["check", "--config", "/nonexistent/server.properties"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(stderr(&out).starts_with("tidelog-tune: error: reading config /nonexistent/server.properties: "));
}

#[test]
fn iotune_refuses_tmpfs() {
    // /dev/shm is tmpfs on every mainstream Linux; skip where it is not.
    let shm = std::path::Path::new("/dev/shm");
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    if !shm.is_dir() || !mountinfo.lines().any(|l| l.contains(" /dev/shm ") && l.contains(" - tmpfs ")) {
        eprintln!("SKIP iotune_refuses_tmpfs: /dev/shm is not a tmpfs here");
        return;
    }
    let dir = tempdir_in(shm);
    let out = run(&["iotune", "--dir", dir.to_str().unwrap(), "--duration-s", "1"]);
    assert_eq!(out.status.code(), Some(2));
    assert_eq!(
        stderr(&out),
        format!("tidelog-tune: error: {} is on tmpfs: tmpfs has no O_DIRECT; use XFS or ext4\n", dir.display())
    );
    assert_eq!(std::fs::read_dir(&dir).unwrap().count(), 0, "iotune left files behind");
    std::fs::remove_dir_all(&dir).unwrap();
}

fn tempdir_in(parent: &std::path::Path) -> std::path::PathBuf {
    let d = parent.join(format!("tidelog-tune-cli-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

#[test]
fn iotune_refuses_a_missing_dir() {
    let out = run(&["iotune", "--dir", "/nonexistent/tidelog"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(stderr(&out).starts_with("tidelog-tune: error: data dir /nonexistent/tidelog: "), "{}", stderr(&out));
}

/// A one-second run in the target dir: the file has exactly the fields the
/// broker reads, 15 write runs + fdatasync + 2 read runs, and no temp file
/// is left. Skipped where the target dir's filesystem has no O_DIRECT.
#[test]
fn iotune_writes_io_properties() {
    let base = std::path::PathBuf::from(env!("CARGO_TARGET_TMPDIR"));
    let dir = tempdir_in(&base);
    let out_file = dir.join("props.json");
    let out =
        run(&["iotune", "--dir", dir.to_str().unwrap(), "--out", out_file.to_str().unwrap(), "--duration-s", "1"]);
    let err = stderr(&out);
    if out.status.code() == Some(2) && (err.contains("O_DIRECT") || err.contains("io_uring unavailable")) {
        eprintln!("SKIP iotune_writes_io_properties: {err}");
        return;
    }
    assert_eq!(out.status.code(), Some(0), "{err}");
    let progress: Vec<&str> = err.lines().collect();
    assert_eq!(progress.len(), 18, "{err}");
    assert!(progress[0].starts_with("iotune: [ 1/18] seq write  4.0 KiB qd  1: "), "{}", progress[0]);
    assert!(progress[15].starts_with("iotune: [16/18] fdatasync after 4 KiB write: p50 "), "{}", progress[15]);
    assert!(progress[17].starts_with("iotune: [18/18] random 4 KiB read qd 16: "), "{}", progress[17]);
    assert!(stdout(&out).starts_with(&format!("iotune: wrote {}: write ", out_file.display())));

    let json: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&out_file).unwrap()).unwrap();
    let keys: Vec<&str> = json.as_object().unwrap().keys().map(String::as_str).collect();
    let mut want = vec![
        "version",
        "dir",
        "filesystem",
        "measured_at_unix_s",
        "write_bandwidth_bytes_per_s",
        "best_write_block_bytes",
        "best_queue_depth",
        "fdatasync_latency_us",
        "read_4k_iops",
        "read_4k_latency_us_p99",
        "results",
    ];
    want.sort();
    assert_eq!(keys, want);
    assert_eq!(json["version"], 1);
    assert_eq!(json["dir"], dir.canonicalize().unwrap().to_str().unwrap());
    let sync = json["fdatasync_latency_us"].as_object().unwrap();
    assert_eq!(sync.keys().map(String::as_str).collect::<Vec<_>>(), vec!["max", "p50", "p90", "p99", "p999"]);
    let p = |k: &str| sync[k].as_u64().unwrap();
    assert!(p("p50") <= p("p90") && p("p90") <= p("p99") && p("p99") <= p("p999") && p("p999") <= p("max"));
    let results = json["results"].as_array().unwrap();
    let shape: Vec<(String, u64, u64)> = results
        .iter()
        .map(|r| {
            (
                r["kind"].as_str().unwrap().to_string(),
                r["block_bytes"].as_u64().unwrap(),
                r["queue_depth"].as_u64().unwrap(),
            )
        })
        .collect();
    let mut want_shape = Vec::new();
    for block in [4096, 16384, 65536, 262144, 1048576] {
        for qd in [1, 4, 16] {
            want_shape.push(("seq_write".to_string(), block, qd));
        }
    }
    want_shape.push(("fdatasync".to_string(), 4096, 1));
    want_shape.push(("rand_read".to_string(), 4096, 1));
    want_shape.push(("rand_read".to_string(), 4096, 16));
    assert_eq!(shape, want_shape);
    let best = (json["best_write_block_bytes"].as_u64().unwrap(), json["best_queue_depth"].as_u64().unwrap());
    assert!(want_shape[..15].iter().any(|(_, b, q)| (*b, *q) == best), "{best:?}");
    let max_bw = results.iter().take(15).map(|r| r["bytes_per_s"].as_u64().unwrap()).max().unwrap();
    assert_eq!(json["write_bandwidth_bytes_per_s"].as_u64().unwrap(), max_bw);
    assert!(results.iter().all(|r| r["ops"].as_u64().unwrap() > 0));
    let left: Vec<String> =
        std::fs::read_dir(&dir).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
    assert_eq!(left, vec!["props.json"]);
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn live_check_produces_a_full_report() {
    // The live host's values are not asserted, only the report's shape.
    let out = run(&["check", "--json", "--dir", env!("CARGO_TARGET_TMPDIR")]);
    assert!(matches!(out.status.code(), Some(0) | Some(1)), "{}", stderr(&out));
    let json: serde_json::Value = serde_json::from_str(&stdout(&out)).unwrap();
    let items: Vec<&str> = json.as_array().unwrap().iter().map(|f| f["item"].as_str().unwrap()).collect();
    assert_eq!(
        &items[..7],
        &[
            "kernel.version",
            "kernel.io_uring_disabled",
            "io_uring.probe",
            "seccomp",
            "container",
            "shards",
            "rlimit.memlock"
        ]
    );
    assert_eq!(items[7], "fs.type");
    assert_eq!(items.last(), Some(&"cpu.smt"));
    let probe = &json.as_array().unwrap()[2];
    assert_ne!(probe["current"], "not probed (fixture root)");
}
