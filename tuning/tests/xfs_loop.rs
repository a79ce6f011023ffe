//! The XFS recipe of tuning/xfs.md on a real (loop-backed) XFS filesystem:
//! mkfs.xfs with the recommended options, mount with the recommended mount
//! options, then `tidelog-tune check` must judge it XFS/pass and
//! `tidelog-tune iotune` must measure it and write a parseable
//! io-properties.json. With `TIDELOG_XFS_RUN_ENGINE_TESTS=1` the engine's
//! storage tests also run on it (`TIDELOG_TEST_DIR=<mnt>`).
//!
//! Needs root, loop devices, mount and mkfs.xfs (Debian: xfsprogs); skips
//! with a message on stderr otherwise. The filesystem is always unmounted
//! and the loop device detached, even when an assertion fails.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// mkfs.xfs options from xfs.md that make sense on a 1 GiB loop file.
const MKFS_ARGS: [&str; 8] = ["-f", "-q", "-m", "crc=1,finobt=1,reflink=1", "-i", "size=512", "-l", "size=64m"];
/// Mount options from xfs.md.
const MOUNT_OPTIONS: &str = "noatime,inode64,logbufs=8,logbsize=256k";

/// Prints past the test harness's capture so the skip reason is visible.
fn say(msg: &str) {
    let _ = writeln!(std::io::stderr(), "{msg}");
}

fn find_tool(name: &str) -> Option<PathBuf> {
    let path = std::env::var("PATH").unwrap_or_default();
    let found = path
        .split(':')
        .chain(["/usr/sbin", "/sbin", "/usr/bin", "/bin"])
        .map(|d| Path::new(d).join(name))
        .find(|p| p.is_file());
    found
}

fn sh(cmd: &Path, args: &[&str]) -> Output {
    Command::new(cmd).args(args).output().unwrap()
}

/// Unmounts, detaches and removes on drop.
struct LoopMount {
    umount: PathBuf,
    losetup: PathBuf,
    work: PathBuf,
    mnt: PathBuf,
    device: Option<String>,
    mounted: bool,
}

impl Drop for LoopMount {
    fn drop(&mut self) {
        if self.mounted {
            let out = sh(&self.umount, &[self.mnt.to_str().unwrap()]);
            if !out.status.success() {
                say(&format!(
                    "xfs_loop: umount failed ({}), lazy unmount",
                    String::from_utf8_lossy(&out.stderr).trim()
                ));
                let _ = sh(&self.umount, &["-l", self.mnt.to_str().unwrap()]);
            }
        }
        if let Some(dev) = &self.device {
            let _ = sh(&self.losetup, &["-d", dev]);
        }
        let _ = std::fs::remove_dir_all(&self.work);
    }
}

fn tune(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_tidelog-tune")).args(args).output().unwrap()
}

#[test]
fn xfs_loop_filesystem_passes_check_and_iotune() {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        say("SKIP xfs_loop: needs root to attach a loop device and mount");
        return;
    }
    let Some(mkfs) = find_tool("mkfs.xfs") else {
        say("SKIP xfs_loop: mkfs.xfs not found (apt-get install xfsprogs)");
        return;
    };
    let (Some(losetup), Some(mount), Some(umount)) = (find_tool("losetup"), find_tool("mount"), find_tool("umount"))
    else {
        say("SKIP xfs_loop: losetup/mount/umount not found (util-linux, mount)");
        return;
    };
    if !Path::new("/dev/loop-control").exists() {
        say("SKIP xfs_loop: no /dev/loop-control (loop devices unavailable here)");
        return;
    }

    let work = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!("xfs-loop-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&work);
    std::fs::create_dir_all(work.join("mnt")).unwrap();
    let image = work.join("xfs.img");
    std::fs::File::create(&image).unwrap().set_len(1 << 30).unwrap();
    let mut guard = LoopMount {
        umount,
        losetup: losetup.clone(),
        mnt: work.join("mnt"),
        work: work.clone(),
        device: None,
        mounted: false,
    };

    let mut args: Vec<&str> = MKFS_ARGS.to_vec();
    args.push(image.to_str().unwrap());
    let out = sh(&mkfs, &args);
    assert!(out.status.success(), "mkfs.xfs failed: {}", String::from_utf8_lossy(&out.stderr));

    let out = sh(&losetup, &["-f", "--show", image.to_str().unwrap()]);
    if !out.status.success() {
        say(&format!("SKIP xfs_loop: losetup failed: {}", String::from_utf8_lossy(&out.stderr).trim()));
        return;
    }
    let device = String::from_utf8(out.stdout).unwrap().trim().to_string();
    guard.device = Some(device.clone());
    let mnt = guard.mnt.clone();
    let out = sh(&mount, &["-t", "xfs", "-o", MOUNT_OPTIONS, &device, mnt.to_str().unwrap()]);
    if !out.status.success() {
        say(&format!("SKIP xfs_loop: mount failed: {}", String::from_utf8_lossy(&out.stderr).trim()));
        return;
    }
    guard.mounted = true;
    let mnt = mnt.canonicalize().unwrap();
    let data = mnt.join("data");
    std::fs::create_dir(&data).unwrap();

    // check: XFS passes, and so do the mount options of the recipe.
    let out = tune(&["check", "--json", "--dir", data.to_str().unwrap()]);
    assert!(matches!(out.status.code(), Some(0) | Some(1)), "{}", String::from_utf8_lossy(&out.stderr));
    let findings: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let get = |item: &str| findings.as_array().unwrap().iter().find(|f| f["item"] == item).cloned().unwrap();
    let fs = get("fs.type");
    assert_eq!(fs["verdict"], "pass");
    assert_eq!(fs["current"], format!("xfs ({device} on {})", mnt.display()));
    assert_eq!(
        (get("mount.atime")["verdict"].clone(), get("mount.atime")["current"].clone()),
        ("pass".into(), "noatime".into())
    );
    assert_eq!(get("mount.discard")["verdict"], "pass");
    assert_eq!(get("mount.barrier")["verdict"], "pass");
    let loop_name = device.trim_start_matches("/dev/");
    let disk = get("disk.type");
    assert!(disk["current"].as_str().unwrap().starts_with(&format!("{loop_name} (")), "{disk}");
    assert_eq!(disk["verdict"], "warn", "a loop device is not NVMe");

    // iotune: measures, writes io-properties.json, leaves nothing else.
    let out = tune(&["iotune", "--dir", data.to_str().unwrap(), "--duration-s", "2"]);
    assert_eq!(out.status.code(), Some(0), "{}", String::from_utf8_lossy(&out.stderr));
    let props_path = data.join("io-properties.json");
    let props: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&props_path).unwrap()).unwrap();
    assert_eq!(props["version"], 1);
    assert_eq!(props["filesystem"], "xfs");
    assert_eq!(props["dir"], data.to_str().unwrap());
    assert!(props["write_bandwidth_bytes_per_s"].as_u64().unwrap() > 0);
    assert!(props["read_4k_iops"].as_u64().unwrap() > 0);
    assert_eq!(props["results"].as_array().unwrap().len(), 18);
    let left: Vec<String> =
        std::fs::read_dir(&data).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
    assert_eq!(left, vec!["io-properties.json"]);

    if std::env::var("TIDELOG_XFS_RUN_ENGINE_TESTS").as_deref() == Ok("1") {
        let engine_dir = mnt.join("engine");
        std::fs::create_dir(&engine_dir).unwrap();
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let workspace = Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap();
        say(&format!("xfs_loop: running the engine's storage tests on {}", engine_dir.display()));
        let status = Command::new(cargo)
            .args(["test", "-p", "tidelog-engine", "--release", "storage"])
            .env("TIDELOG_TEST_DIR", &engine_dir)
            .current_dir(workspace)
            .status()
            .unwrap();
        assert!(status.success(), "engine storage tests failed on XFS");
    } else {
        say("xfs_loop: engine storage tests not run (set TIDELOG_XFS_RUN_ENGINE_TESTS=1)");
    }
    drop(guard);
    assert!(!work.exists());
}
