//! Host hiccups: how late a thread that does nothing but sleep woke up.
//!
//! One thread per core, pinned, sleeps `interval` over and over and records
//! how much later than asked it woke (the idea of Azul's jHiccup). Nothing in
//! the broker or the clients can make a sleeping thread late except the host
//! itself: the hypervisor taking the vCPU away (steal), an interrupt storm, a
//! long non-preemptible kernel section, or other threads holding that core at
//! the same or higher priority. So a produce or end-to-end spike that lines
//! up in time and size with a hiccup here was very likely the host, not the
//! broker; a spike with no hiccup beside it was not.
//!
//! Steal time is read per CPU from `/proc/stat` at start and stop.
//!
//! Cost: `cores × 1 / interval` wakeups per second (2 000/s on 2 cores at the
//! default 1 ms), each a few µs of CPU.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use serde::{Deserialize, Serialize};

use crate::stats::{keep_slowest, new_latency_histogram, Percentiles, Slow, SLOW_US};
use crate::util::wall_now_us;

#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct CpuHiccups {
    pub cpu: usize,
    /// How late each wake-up was, in µs.
    pub late_us: Percentiles,
    pub over_1ms: u64,
    pub over_10ms: u64,
    /// Steal time this CPU reported over the run, in ms (0 on bare metal).
    pub steal_ms: f64,
    /// The longest hiccups (at least `stats::SLOW_US`), with when they ended.
    pub slowest: Vec<Slow>,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct Hiccups {
    pub interval_us: u64,
    pub seconds: f64,
    pub per_cpu: Vec<CpuHiccups>,
}

impl Hiccups {
    /// The longest hiccup on any CPU, in µs.
    pub fn max_us(&self) -> f64 {
        self.per_cpu.iter().map(|c| c.late_us.max).fold(0.0, f64::max)
    }
    pub fn steal_ms(&self) -> f64 {
        self.per_cpu.iter().map(|c| c.steal_ms).sum()
    }
    /// The longest hiccups over all CPUs as (cpu, hiccup), longest first.
    pub fn slowest(&self) -> Vec<(usize, Slow)> {
        let mut all: Vec<(usize, Slow)> =
            self.per_cpu.iter().flat_map(|c| c.slowest.iter().map(move |s| (c.cpu, *s))).collect();
        all.sort_by_key(|s| std::cmp::Reverse(s.1.us));
        all
    }
}

struct CpuResult {
    cpu: usize,
    late: Histogram<u64>,
    slowest: Vec<Slow>,
}

pub struct HiccupMeter {
    interval: Duration,
    started: Instant,
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<CpuResult>>,
    steal_at_start: Vec<u64>,
}

/// Per-CPU steal time in clock ticks, from the `cpuN` lines of `/proc/stat`
/// (empty when unreadable).
fn steal_ticks() -> Vec<(usize, u64)> {
    let text = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    parse_steal(&text)
}

fn parse_steal(stat: &str) -> Vec<(usize, u64)> {
    stat.lines()
        .filter_map(|l| {
            let mut f = l.split_whitespace();
            let cpu: usize = f.next()?.strip_prefix("cpu")?.parse().ok()?;
            // user nice system idle iowait irq softirq steal
            let steal = f.nth(7)?.parse().ok()?;
            Some((cpu, steal))
        })
        .collect()
}

fn ticks_per_second() -> f64 {
    // SAFETY: sysconf only reads a constant.
    let t = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if t > 0 {
        t as f64
    } else {
        100.0
    }
}

/// Runs `f` with a meter on `cores` when `interval` is set, and stops the
/// meter when `f` returns, whatever it returns.
pub fn measure_during<T>(
    cores: &[usize],
    interval: Option<Duration>,
    f: impl FnOnce() -> anyhow::Result<T>,
) -> anyhow::Result<(T, Option<Hiccups>)> {
    let meter = match interval {
        Some(interval) => Some(HiccupMeter::start(cores, interval)?),
        None => None,
    };
    let outcome = f();
    let hiccups = meter.map(HiccupMeter::finish);
    Ok((outcome?, hiccups))
}

impl HiccupMeter {
    /// Starts one sleeper per core in `cores`.
    pub fn start(cores: &[usize], interval: Duration) -> anyhow::Result<HiccupMeter> {
        let started = Instant::now();
        let stop = Arc::new(AtomicBool::new(false));
        let steal: Vec<(usize, u64)> = steal_ticks();
        let mut threads = Vec::new();
        for &cpu in cores {
            let stop_flag = stop.clone();
            let spawned = std::thread::Builder::new().name(format!("hiccup-{cpu}")).spawn(move || {
                let stop = stop_flag;
                let pinned = core_affinity::set_for_current(core_affinity::CoreId { id: cpu });
                if !pinned {
                    eprintln!("warning: could not pin the hiccup meter to core {cpu}");
                }
                let mut late = new_latency_histogram();
                let mut slowest = Vec::new();
                while !stop.load(Ordering::Relaxed) {
                    let t0 = Instant::now();
                    std::thread::sleep(interval);
                    let us = t0.elapsed().saturating_sub(interval).as_micros() as u64;
                    let _ = late.record(us.max(1));
                    if us >= SLOW_US {
                        keep_slowest(&mut slowest, Slow { at_unix_ms: wall_now_us() / 1000, us });
                    }
                }
                CpuResult { cpu, late, slowest }
            });
            match spawned {
                Ok(h) => threads.push(h),
                Err(e) => {
                    // Do not leave the sleepers already started running.
                    stop.store(true, Ordering::Relaxed);
                    for h in threads {
                        let _ = h.join();
                    }
                    return Err(anyhow::anyhow!("starting the hiccup meter on core {cpu}: {e}"));
                }
            }
        }
        let steal_at_start =
            cores.iter().map(|c| steal.iter().find(|(cpu, _)| cpu == c).map(|s| s.1).unwrap_or(0)).collect();
        Ok(HiccupMeter { interval, started, stop, threads, steal_at_start })
    }

    pub fn finish(self) -> Hiccups {
        self.stop.store(true, Ordering::Relaxed);
        let seconds = self.started.elapsed().as_secs_f64();
        let steal_now = steal_ticks();
        let tick_ms = 1000.0 / ticks_per_second();
        let mut out = Hiccups { interval_us: self.interval.as_micros() as u64, seconds, ..Hiccups::default() };
        for (h, start) in self.threads.into_iter().zip(self.steal_at_start) {
            let Ok(r) = h.join() else { continue };
            let now = steal_now.iter().find(|(cpu, _)| *cpu == r.cpu).map(|s| s.1).unwrap_or(start);
            let count_over = |us: u64| r.late.count_between(us, u64::MAX);
            out.per_cpu.push(CpuHiccups {
                cpu: r.cpu,
                late_us: Percentiles::of(&r.late),
                over_1ms: count_over(1_000),
                over_10ms: count_over(10_000),
                steal_ms: now.saturating_sub(start) as f64 * tick_ms,
                slowest: r.slowest,
            });
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn steal_is_the_eighth_value_of_each_cpu_line() {
        let stat = "cpu  10 0 5 100 1 0 2 7 0 0\ncpu0 4 0 2 50 1 0 1 3 0 0\ncpu1 6 0 3 50 0 0 1 4 0 0\nintr 1 2 3\n";
        assert_eq!(parse_steal(stat), vec![(0, 3), (1, 4)]);
    }

    #[test]
    fn one_sample_per_wakeup() {
        let meter = HiccupMeter::start(&[0], Duration::from_millis(1)).unwrap();
        std::thread::sleep(Duration::from_millis(100));
        let h = meter.finish();
        assert_eq!(h.per_cpu.len(), 1);
        let c = &h.per_cpu[0];
        // At most one wake-up per interval; at least a few even on a busy host.
        assert!(c.late_us.count >= 10 && c.late_us.count <= 101, "{c:?}");
        assert!(c.late_us.max >= c.late_us.p50 && c.over_10ms <= c.over_1ms, "{c:?}");
        assert!(h.seconds >= 0.1 && h.interval_us == 1000);
        assert!(c.slowest.iter().all(|s| s.us >= SLOW_US));
        assert_eq!(h.slowest().len(), c.slowest.len());
    }
}
