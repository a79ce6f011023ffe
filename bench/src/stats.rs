//! Measurements: latency histograms (hdrhistogram, microseconds), the pacer
//! that defines each record's intended send time (coordinated-omission
//! correction), and one-second throughput buckets.
//!
//! Each producer/consumer thread owns its own `ThreadStats`; the main thread
//! merges them after the threads are joined, so nothing here is shared.

use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use serde::Serialize;

/// Highest latency a histogram tracks: 1 hour in µs; larger values saturate.
const LATENCY_MAX_US: u64 = 3_600_000_000;

pub fn new_latency_histogram() -> Histogram<u64> {
    // Three significant digits over 1 µs .. 1 h; the bounds are constants, so
    // this cannot fail.
    match Histogram::new_with_bounds(1, LATENCY_MAX_US, 3) {
        Ok(h) => h,
        Err(e) => unreachable!("constant histogram bounds rejected: {e}"),
    }
}

/// Records `value_us` clamped to the histogram's range.
pub fn record_us(h: &mut Histogram<u64>, value_us: u64) {
    let v = value_us.clamp(1, LATENCY_MAX_US);
    // In range by construction.
    let _ = h.record(v);
}

/// Records `value_us` for `count` events.
pub fn record_us_n(h: &mut Histogram<u64>, value_us: u64, count: u64) {
    let v = value_us.clamp(1, LATENCY_MAX_US);
    let _ = h.record_n(v, count);
}

/// Decides when each record *should* be sent. For a paced run, record `i`
/// of this producer is due at `start + i / rate`; latency is measured from
/// that intended time, not from when the (possibly stalled) producer got
/// round to sending it. That is the coordinated-omission correction: a stall
/// shows up as latency on every record that should have gone out during it.
#[derive(Clone, Debug)]
pub struct Pacer {
    start: Instant,
    interval_ns: f64,
    next_index: u64,
}

impl Pacer {
    /// `rate_per_s` of 0 means unpaced: every record is due immediately.
    pub fn new(start: Instant, rate_per_s: f64) -> Pacer {
        let interval_ns = if rate_per_s > 0.0 { 1e9 / rate_per_s } else { 0.0 };
        Pacer { start, interval_ns, next_index: 0 }
    }

    pub fn is_paced(&self) -> bool {
        self.interval_ns > 0.0
    }

    /// Intended send time of the next record.
    pub fn next_due(&self) -> Instant {
        self.start + Duration::from_nanos((self.next_index as f64 * self.interval_ns) as u64)
    }

    /// If the next record is due at or before `now`, consumes it and returns
    /// its intended send time (for an unpaced run: `now`).
    pub fn take_due(&mut self, now: Instant) -> Option<Instant> {
        if !self.is_paced() {
            self.next_index += 1;
            return Some(now);
        }
        let due = self.next_due();
        if due <= now {
            self.next_index += 1;
            Some(due)
        } else {
            None
        }
    }

    pub fn taken(&self) -> u64 {
        self.next_index
    }
}

/// Events at least this long are also kept one by one, with when they happened.
pub const SLOW_US: u64 = 5_000;
/// At most this many such events are kept per series (the longest).
pub const SLOW_MAX: usize = 20;

/// One long event (a batch ack, a host hiccup) and when it ended, so spikes
/// in different series can be lined up.
#[derive(Clone, Copy, Debug, Default, Serialize, serde::Deserialize, PartialEq)]
pub struct Slow {
    pub at_unix_ms: u64,
    pub us: u64,
}

/// Adds `s` to `list` when it is at least `SLOW_US`, keeping the `SLOW_MAX`
/// longest, longest first.
pub fn keep_slowest(list: &mut Vec<Slow>, s: Slow) {
    if s.us < SLOW_US {
        return;
    }
    let at = list.partition_point(|x| x.us >= s.us);
    if at < SLOW_MAX {
        list.insert(at, s);
        list.truncate(SLOW_MAX);
    }
}

/// Throughput per one-second bucket since the run start.
#[derive(Clone, Debug, Default, Serialize, PartialEq)]
pub struct Timeline {
    pub records: Vec<u64>,
    pub bytes: Vec<u64>,
}

impl Timeline {
    pub fn add(&mut self, second: usize, records: u64, bytes: u64) {
        if self.records.len() <= second {
            self.records.resize(second + 1, 0);
            self.bytes.resize(second + 1, 0);
        }
        self.records[second] += records;
        self.bytes[second] += bytes;
    }

    pub fn merge(&mut self, other: &Timeline) {
        for (i, (&r, &b)) in other.records.iter().zip(&other.bytes).enumerate() {
            self.add(i, r, b);
        }
    }
}

/// Everything one thread measured.
#[derive(Clone, Debug)]
pub struct ThreadStats {
    /// Produce ack latency per record, from intended send time.
    pub ack_record_us: Histogram<u64>,
    /// Produce ack latency per batch, from when the request was written.
    pub ack_batch_us: Histogram<u64>,
    /// The slowest of those, with when each ack arrived.
    pub slowest_batch_acks: Vec<Slow>,
    /// Record timestamp (intended send time) to consumed.
    pub end_to_end_us: Histogram<u64>,
    /// Fetch round trip (request written to whole response read) of the
    /// fetches that returned records.
    pub fetch_us: Histogram<u64>,
    pub produced: Timeline,
    pub consumed: Timeline,
    pub produced_records: u64,
    pub produced_bytes: u64,
    pub consumed_records: u64,
    pub consumed_bytes: u64,
    pub requests: u64,
    pub errors: u64,
    pub retries: u64,
    /// Records given up on after the retries ran out.
    pub failed_records: u64,
    pub error_codes: std::collections::BTreeMap<i16, u64>,
    /// Consumer groups: generations joined (1 per member without rebalances).
    pub group_generations: u64,
    pub group_commits: u64,
    /// Codes on group calls; some are part of the protocol (79
    /// MEMBER_ID_REQUIRED, 27 REBALANCE_IN_PROGRESS), so not in `errors`.
    pub group_error_codes: std::collections::BTreeMap<i16, u64>,
}

impl Default for ThreadStats {
    fn default() -> Self {
        ThreadStats {
            ack_record_us: new_latency_histogram(),
            ack_batch_us: new_latency_histogram(),
            slowest_batch_acks: Vec::new(),
            end_to_end_us: new_latency_histogram(),
            fetch_us: new_latency_histogram(),
            produced: Timeline::default(),
            consumed: Timeline::default(),
            produced_records: 0,
            produced_bytes: 0,
            consumed_records: 0,
            consumed_bytes: 0,
            requests: 0,
            errors: 0,
            retries: 0,
            failed_records: 0,
            error_codes: Default::default(),
            group_generations: 0,
            group_commits: 0,
            group_error_codes: Default::default(),
        }
    }
}

impl ThreadStats {
    pub fn merge(&mut self, other: &ThreadStats) {
        let _ = self.ack_record_us.add(&other.ack_record_us);
        let _ = self.ack_batch_us.add(&other.ack_batch_us);
        for s in &other.slowest_batch_acks {
            keep_slowest(&mut self.slowest_batch_acks, *s);
        }
        let _ = self.end_to_end_us.add(&other.end_to_end_us);
        let _ = self.fetch_us.add(&other.fetch_us);
        self.produced.merge(&other.produced);
        self.consumed.merge(&other.consumed);
        self.produced_records += other.produced_records;
        self.produced_bytes += other.produced_bytes;
        self.consumed_records += other.consumed_records;
        self.consumed_bytes += other.consumed_bytes;
        self.requests += other.requests;
        self.errors += other.errors;
        self.retries += other.retries;
        self.failed_records += other.failed_records;
        for (k, v) in &other.error_codes {
            *self.error_codes.entry(*k).or_default() += v;
        }
        self.group_generations += other.group_generations;
        self.group_commits += other.group_commits;
        for (k, v) in &other.group_error_codes {
            *self.group_error_codes.entry(*k).or_default() += v;
        }
    }

    pub fn count_error(&mut self, code: i16) {
        self.errors += 1;
        *self.error_codes.entry(code).or_default() += 1;
    }
}

/// The percentiles every report shows.
#[derive(Clone, Debug, Default, Serialize, serde::Deserialize, PartialEq)]
pub struct Percentiles {
    pub count: u64,
    pub mean: f64,
    pub p50: f64,
    pub p90: f64,
    pub p99: f64,
    pub p999: f64,
    pub p9999: f64,
    pub max: f64,
}

impl Percentiles {
    /// Summarizes a µs histogram in µs.
    pub fn of(h: &Histogram<u64>) -> Percentiles {
        if h.is_empty() {
            return Percentiles::default();
        }
        Percentiles {
            count: h.len(),
            mean: h.mean(),
            p50: h.value_at_quantile(0.50) as f64,
            p90: h.value_at_quantile(0.90) as f64,
            p99: h.value_at_quantile(0.99) as f64,
            p999: h.value_at_quantile(0.999) as f64,
            p9999: h.value_at_quantile(0.9999) as f64,
            max: h.max() as f64,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keep_slowest_keeps_the_longest_at_or_above_the_threshold() {
        let mut l = Vec::new();
        keep_slowest(&mut l, Slow { at_unix_ms: 1, us: SLOW_US - 1 });
        assert!(l.is_empty());
        for i in 0..(SLOW_MAX as u64 + 5) {
            // Out of order on purpose.
            let us = SLOW_US + (i * 7919) % 101;
            keep_slowest(&mut l, Slow { at_unix_ms: i, us });
        }
        assert_eq!(l.len(), SLOW_MAX);
        assert!(l.windows(2).all(|w| w[0].us >= w[1].us), "{l:?}");
        let mut all: Vec<u64> = (0..(SLOW_MAX as u64 + 5)).map(|i| SLOW_US + (i * 7919) % 101).collect();
        all.sort_unstable_by(|a, b| b.cmp(a));
        assert_eq!(l.iter().map(|s| s.us).collect::<Vec<_>>(), all[..SLOW_MAX]);
    }

    /// A producer paced at 1000 records/s sends each record 100 µs after it
    /// is due and gets the ack back at once, except that it stalls for one
    /// second at t = 2 s (the broker stopped answering, the socket blocked).
    /// During the stall no record is sent. An uncorrected measurement (send
    /// to ack) sees one slow record; measured from the intended send time,
    /// the ~1000 records that should have gone out during the stall all
    /// carry their share of it, from ~1 s down to ~0.
    #[test]
    fn coordinated_omission_correction_with_simulated_stall() {
        let start = Instant::now();
        let mut pacer = Pacer::new(start, 1000.0);
        let mut corrected = new_latency_histogram();
        let mut naive = new_latency_histogram();
        let service = Duration::from_micros(100);
        let stall_at = start + Duration::from_secs(2);
        let stall = Duration::from_secs(1);
        let mut clock = start;
        let end = start + Duration::from_secs(5);
        let mut stalled = false;
        while clock < end {
            while let Some(intended) = pacer.take_due(clock) {
                let mut send = clock.max(intended);
                let mut ack = send + service;
                if !stalled && send >= stall_at {
                    stalled = true;
                    ack += stall; // this request hangs for the whole stall
                }
                record_us(&mut naive, (ack - send).as_micros() as u64);
                record_us(&mut corrected, (ack - intended).as_micros() as u64);
                send = ack; // a blocked sender cannot send until the ack
                clock = clock.max(send);
            }
            clock += Duration::from_micros(50);
        }
        assert_eq!(pacer.taken(), corrected.len());
        assert!((4990..=5010).contains(&corrected.len()), "{} records", corrected.len());
        // Uncorrected: only one record saw the stall.
        assert_eq!(naive.count_between(500_000, u64::MAX), 1);
        assert!(naive.value_at_quantile(0.99) < 1_000);
        // Corrected: the ~1000 records due during the stall are late, plus
        // the ~110 that arrive while the backlog drains at 100 µs each
        // (1000 / (1 - 0.1)), spread evenly from ~1 s down.
        let late = corrected.count_between(1_000, u64::MAX);
        assert!((1_000..=1_150).contains(&late), "{late} late records");
        assert!(corrected.value_at_quantile(0.99) > 900_000, "p99 {}", corrected.value_at_quantile(0.99));
        let p90 = corrected.value_at_quantile(0.90);
        assert!((400_000..=600_000).contains(&p90), "p90 {p90} should be about half the stall");
        assert!(corrected.max() >= 1_000_000);
        assert!(corrected.value_at_quantile(0.5) < 1_000);
    }

    #[test]
    fn unpaced_pacer_is_always_due() {
        let now = Instant::now();
        let mut p = Pacer::new(now, 0.0);
        assert!(!p.is_paced());
        assert_eq!(p.take_due(now), Some(now));
        assert_eq!(p.taken(), 1);
    }

    #[test]
    fn pacer_does_not_run_ahead() {
        let start = Instant::now();
        let mut p = Pacer::new(start, 10.0);
        assert!(p.take_due(start).is_some());
        assert!(p.take_due(start).is_none());
        assert!(p.take_due(start + Duration::from_millis(100)).is_some());
        // Catching up after a delay releases every overdue record at once,
        // each with its own intended time.
        let late = start + Duration::from_millis(1000);
        let mut n = 0;
        while let Some(t) = p.take_due(late) {
            assert!(t <= late);
            n += 1;
        }
        assert_eq!(n, 9);
    }

    #[test]
    fn timeline_merge() {
        let mut a = Timeline::default();
        a.add(0, 1, 10);
        let mut b = Timeline::default();
        b.add(2, 3, 30);
        a.merge(&b);
        assert_eq!(a.records, vec![1, 0, 3]);
        assert_eq!(a.bytes, vec![10, 0, 30]);
    }
}
