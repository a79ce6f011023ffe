//! tidelog-tune: host checks, tuners and disk measurement for tidelog.
//!
//! - [`check`] audits the host (kernel, io_uring, memlock, filesystem, disk,
//!   IRQs, NIC, sysctls, CPU) and proposes run-time fixes;
//! - [`apply`] makes or prints those fixes and persists them;
//! - [`iotune`] measures a data dir and writes the io-properties file the
//!   broker reads.
//!
//! Host files are always read and written through [`host::Host`] and its
//! root prefix so tests run against fixture trees. Everything runs in the
//! short-lived `tidelog-tune` process, never on a broker shard.

#[cfg(not(target_os = "linux"))]
compile_error!("tidelog-tune is Linux-only: it audits /proc and /sys and measures disks with io_uring and O_DIRECT (see linux-only.md)");

pub mod apply;
pub mod check;
pub mod config;
pub mod host;
pub mod iotune;
pub mod live;
pub mod mounts;
