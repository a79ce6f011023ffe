//! The `tidelog-tune` binary: `check`, `apply` and `iotune` for a tidelog
//! host. See `tidelog-tune --help` and tuning/xfs.md.

#[cfg(not(target_os = "linux"))]
compile_error!(
    "tidelog is Linux-only: it needs io_uring, O_DIRECT, thread-per-core CPU pinning and /proc + /sys; see linux-only.md"
);

use anyhow::Result;
use clap::{Args, Parser, Subcommand};
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;
use tidelog_tune::check::{self, Context, Finding, Options};
use tidelog_tune::{apply, iotune};

/// Host checks, tuners and disk measurement for the tidelog broker.
///
/// `check` audits, `apply` fixes what can be fixed at run time, `iotune`
/// measures the data dir. Requirements and failure messages are described
/// in linux-only.md; the XFS recipe is tuning/xfs.md.
#[derive(Parser, Debug)]
#[command(name = "tidelog-tune", version)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Read-only audit: one line per item with pass/warn/fail/skip, the
    /// current value, the recommended value and why. Exits 1 if any item fails.
    Check {
        #[command(flatten)]
        target: Target,
        /// Print a JSON array of {item, verdict, current, recommended, why}
        /// instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Make the run-time fixes the audit proposes (sysctls, block queue
    /// settings, IRQ affinity, RPS/XPS, THP, CPU governor, clocksource).
    /// Without --yes this is a dry run that only prints each write as
    /// `path: old -> new`.
    Apply {
        #[command(flatten)]
        target: Target,
        /// Print the writes without making them (the default).
        #[arg(long, conflicts_with = "yes")]
        dry_run: bool,
        /// Make the writes (through --root) and print them.
        #[arg(long)]
        yes: bool,
        /// Also write persistence files into DIR: 60-tidelog.conf
        /// (sysctl.d), 60-tidelog.rules (udev, block queue settings) and
        /// tidelog-tune.service (systemd oneshot for the rest). Without
        /// --yes their contents are only printed. DIR is not under --root.
        #[arg(long, value_name = "DIR")]
        persist: Option<PathBuf>,
    },
    /// Measure the data dir: O_DIRECT sequential writes (4 KiB..1 MiB
    /// blocks, queue depth 1/4/16, io_uring), fdatasync latency
    /// percentiles and random 4 KiB reads; writes an io-properties JSON
    /// file the broker reads. Progress goes to stderr.
    Iotune {
        /// Directory to measure (the broker's log.dirs entry). A temp file
        /// is created in it and removed afterwards.
        #[arg(long, value_name = "DIR")]
        dir: PathBuf,
        /// Where to write the io-properties file [default: DIR/io-properties.json].
        #[arg(long, value_name = "FILE")]
        out: Option<PathBuf>,
        /// Total measuring time in seconds, split 60/20/20 over writes,
        /// fdatasync and reads.
        #[arg(long, value_name = "N", default_value_t = iotune::DEFAULT_DURATION_S)]
        duration_s: u64,
    },
}

/// Which host and which broker setup to audit.
#[derive(Args, Debug)]
struct Target {
    /// Root prefix for every /proc, /sys and /etc path read or written; use
    /// a fixture tree in tests. Probes that need syscalls (io_uring,
    /// getrlimit, ethtool) only run when this is /.
    #[arg(long, value_name = "DIR", default_value = "/")]
    root: PathBuf,
    /// Data dir to audit (filesystem, mount options, block device). A path
    /// on the audited host, matched against its /proc/self/mountinfo.
    #[arg(long, value_name = "DATA_DIR", conflicts_with = "config")]
    dir: Option<PathBuf>,
    /// Broker server.properties: reads log.dirs (first entry), num.shards
    /// and io.memory.bytes. Read as given, not under --root.
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// Number of shards the broker runs (shard i on the i-th CPU); default
    /// num.shards from --config, else every CPU.
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u64).range(1..=4096))]
    shards: Option<u64>,
}

impl Target {
    fn options(&self) -> Options {
        Options {
            root: self.root.clone(),
            data_dir: self.dir.clone(),
            config: self.config.clone(),
            shard_count: self.shards.map(|n| n as usize),
        }
    }
}

fn header(ctx: &Context) -> String {
    format!(
        "tidelog-tune: root {}, data dir {}, {} shards, io.memory.bytes {}, memlock needed {} bytes",
        ctx.host.root().display(),
        ctx.data_dir.as_ref().map_or("(none)".to_string(), |d| d.display().to_string()),
        ctx.shard_count,
        ctx.io_memory_bytes,
        ctx.memlock_needed_bytes()
    )
}

fn format_line(f: &Finding) -> String {
    format!(
        "{:<4}  {:<28} current: {}; recommended: {} -- {}",
        f.verdict.label(),
        f.item,
        f.current,
        f.recommended,
        f.why
    )
}

fn run_check(target: &Target, json: bool) -> Result<ExitCode> {
    let ctx = Context::resolve(&target.options())?;
    let findings = check::run_all(&ctx);
    let mut out = std::io::stdout().lock();
    if json {
        writeln!(out, "{}", serde_json::to_string_pretty(&findings)?)?;
    } else {
        writeln!(out, "{}", header(&ctx))?;
        for f in &findings {
            writeln!(out, "{}", format_line(f))?;
        }
        let count = |v| findings.iter().filter(|f| f.verdict == v).count();
        writeln!(
            out,
            "summary: {} pass, {} warn, {} fail, {} skip",
            count(check::Verdict::Pass),
            count(check::Verdict::Warn),
            count(check::Verdict::Fail),
            count(check::Verdict::Skip)
        )?;
    }
    Ok(if check::any_failed(&findings) { ExitCode::from(1) } else { ExitCode::SUCCESS })
}

fn run_apply(target: &Target, yes: bool, persist: Option<&PathBuf>) -> Result<ExitCode> {
    let ctx = Context::resolve(&target.options())?;
    let findings = check::run_all(&ctx);
    let planned = apply::plan(&findings);
    let mut out = std::io::stdout().lock();
    writeln!(out, "{}", header(&ctx))?;
    if !yes {
        writeln!(out, "dry run: nothing is written; pass --yes to make these writes")?;
    }
    let (report, failed) = apply::execute(&ctx.host, &planned, yes);
    write!(out, "{report}")?;
    for f in apply::manual_items(&findings) {
        writeln!(out, "manual: {} is {}; recommended {}", f.item, f.current, f.recommended)?;
    }
    if let Some(dir) = persist {
        write!(out, "{}", apply::persist(dir, &planned, yes)?)?;
    }
    if failed > 0 {
        writeln!(out, "{failed} write(s) failed")?;
        return Ok(ExitCode::from(1));
    }
    Ok(ExitCode::SUCCESS)
}

fn run_iotune(dir: &Path, out: Option<&PathBuf>, duration_s: u64) -> Result<ExitCode> {
    let options = iotune::IotuneOptions { dir: dir.to_path_buf(), duration: Duration::from_secs(duration_s.max(1)) };
    let props = iotune::run(&options, |line| eprintln!("{line}"))?;
    let path = out.cloned().unwrap_or_else(|| dir.join("io-properties.json"));
    iotune::write_properties(&path, &props)?;
    println!(
        "iotune: wrote {}: write {} B/s (best block {} B at queue depth {}), fdatasync p99 {} us, 4 KiB reads {} IOPS p99 {} us",
        path.display(),
        props.write_bandwidth_bytes_per_s,
        props.best_write_block_bytes,
        props.best_queue_depth,
        props.fdatasync_latency_us.p99,
        props.read_4k_iops,
        props.read_4k_latency_us_p99
    );
    Ok(ExitCode::SUCCESS)
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match &cli.command {
        Command::Check { target, json } => run_check(target, *json),
        Command::Apply { target, dry_run: _, yes, persist } => run_apply(target, *yes, persist.as_ref()),
        Command::Iotune { dir, out, duration_s } => run_iotune(dir, out.as_ref(), *duration_s),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("tidelog-tune: error: {e:#}");
            ExitCode::from(2)
        }
    }
}
