//! The command line documents itself: every flag of every subcommand has a
//! description in `--help`, and the README's commands only use flags that
//! exist.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test crate: a failed unwrap is a failed test

use std::collections::BTreeSet;
use std::process::Command;

fn help(args: &[&str]) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_tidelog-bench")).args(args).arg("--help").output().unwrap();
    assert!(out.status.success(), "{args:?} --help failed");
    String::from_utf8(out.stdout).unwrap()
}

/// Flags named in a long help text, each with the text that describes it
/// (clap's long help puts the description on the lines under the flag).
fn flags_with_help(text: &str) -> Vec<(String, String)> {
    let lines: Vec<&str> = text.lines().collect();
    let mut out = Vec::new();
    for (i, line) in lines.iter().enumerate() {
        let t = line.trim_start();
        let Some(at) = t.find("--").filter(|_| t.starts_with('-')) else { continue };
        let flag: String = t[at..].chars().take_while(|c| !c.is_whitespace() && *c != ',').collect();
        // Short help puts the description on the same line, after the
        // flag and its <VALUE>.
        let rest = t[at + flag.len()..].trim_start();
        let rest = if rest.starts_with('<') { rest.split_once('>').map_or("", |r| r.1) } else { rest };
        let rest = rest.trim_start_matches(['.', ' ']);
        let mut doc = format!("{rest} ");
        for next in &lines[i + 1..] {
            let n = next.trim_start();
            if n.is_empty() || n.starts_with('-') || next.len() - n.len() < 8 {
                break;
            }
            doc.push_str(n);
            doc.push(' ');
        }
        out.push((flag, doc));
    }
    out
}

#[test]
fn every_flag_of_every_subcommand_is_documented() {
    for cmd in [&["run"][..], &["baseline"], &["compare"], &[]] {
        let text = help(cmd);
        let flags = flags_with_help(&text);
        assert!(!flags.is_empty(), "{cmd:?}: no flags found in\n{text}");
        for (flag, doc) in &flags {
            assert!(doc.split_whitespace().count() >= 2, "{cmd:?} {flag} has no description:\n{text}");
        }
    }
    let run: BTreeSet<String> = flags_with_help(&help(&["run"])).into_iter().map(|f| f.0).collect();
    for f in ["--consumer-mode", "--assignor", "--producers", "--start", "--records", "--rate-mb", "--baseline"] {
        assert!(run.contains(f), "run --help lacks {f}");
    }
}

#[test]
fn readme_commands_use_real_flags() {
    let readme = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md")).unwrap();
    let mut known: BTreeSet<String> = BTreeSet::new();
    for cmd in ["run", "baseline", "compare"] {
        known.extend(flags_with_help(&help(&[cmd])).into_iter().map(|f| f.0));
    }
    let mut checked = 0;
    for line in readme.lines().filter(|l| l.contains("tidelog-bench ")) {
        for word in line.split_whitespace().filter(|w| w.starts_with("--")) {
            let flag = word.split('=').next().unwrap().trim_end_matches(['`', ')', ',', '.']);
            if flag == "--" || flag == "--features" || flag == "--release" || flag == "--bench" {
                continue;
            }
            assert!(known.contains(flag), "README uses {flag}, which tidelog-bench does not have: {line}");
            checked += 1;
        }
    }
    assert!(checked > 10, "expected the README to show commands with flags");
}

#[test]
fn a_too_short_hiccup_interval_is_refused_before_anything_runs() {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_tidelog-bench"))
        .args(["run", "--bootstrap", "127.0.0.1:1", "--no-baseline", "--hiccup-interval-us", "10"])
        .output()
        .expect("run tidelog-bench");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("--hiccup-interval-us 10") && err.contains("at least 100"), "{err}");
}

#[test]
fn acks_take_kafka_spellings_and_refuse_others() {
    let run = |acks: &str| {
        std::process::Command::new(env!("CARGO_BIN_EXE_tidelog-bench"))
            .args(["run", "--bootstrap", "127.0.0.1:1", "--no-baseline", "--hiccup-interval-us", "0", "--acks", acks])
            .output()
            .expect("run tidelog-bench")
    };
    let out = run("2");
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains("expected all, -1, 1 or 0"), "{err}");
    // Accepted spellings get past the flags (and then fail to connect to port 1).
    for acks in ["all", "-1", "1", "0"] {
        let out = run(acks);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success());
        assert!(!err.contains("expected all") && err.contains("127.0.0.1:1"), "--acks {acks}: {err}");
    }
}
