//! Facts only a syscall on the live host can tell: an io_uring probe,
//! RLIMIT_MEMLOCK, the CPU affinity mask, NIC ring sizes (ethtool ioctl) and
//! the filesystem magic of a path. Checks call these only when the root is
//! `/`; with a fixture root they report the item as not probed.

use std::ffi::CString;
use std::io;
use std::path::Path;

/// io_uring opcodes tidelog uses, by name.
const WANTED_OPS: [(&str, u8); 10] = [
    ("read", io_uring::opcode::Read::CODE),
    ("write", io_uring::opcode::Write::CODE),
    ("fsync", io_uring::opcode::Fsync::CODE),
    ("fallocate", io_uring::opcode::Fallocate::CODE),
    ("openat", io_uring::opcode::OpenAt::CODE),
    ("close", io_uring::opcode::Close::CODE),
    ("accept", io_uring::opcode::Accept::CODE),
    ("send", io_uring::opcode::Send::CODE),
    ("recv", io_uring::opcode::Recv::CODE),
    ("splice", io_uring::opcode::Splice::CODE),
];

/// Outcome of creating a real ring.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum UringProbe {
    /// `io_uring_setup` worked; lists wanted opcodes the kernel lacks.
    Available { missing_ops: Vec<&'static str> },
    /// `io_uring_setup` failed with this error.
    Refused(String),
}

/// Creates an 8-entry ring and asks the kernel which opcodes it supports.
pub fn probe_io_uring() -> UringProbe {
    let ring = match io_uring::IoUring::new(8) {
        Ok(ring) => ring,
        Err(e) => return UringProbe::Refused(describe_errno(&e)),
    };
    let mut probe = io_uring::Probe::new();
    if let Err(e) = ring.submitter().register_probe(&mut probe) {
        return UringProbe::Refused(format!("IORING_REGISTER_PROBE: {}", describe_errno(&e)));
    }
    let missing_ops = WANTED_OPS.iter().filter(|(_, code)| !probe.is_supported(*code)).map(|(name, _)| *name).collect();
    UringProbe::Available { missing_ops }
}

/// `EPERM (Operation not permitted)` style text for an io error.
pub fn describe_errno(e: &io::Error) -> String {
    let name = match e.raw_os_error() {
        Some(libc::EPERM) => "EPERM",
        Some(libc::ENOSYS) => "ENOSYS",
        Some(libc::ENOMEM) => "ENOMEM",
        Some(libc::EINVAL) => "EINVAL",
        Some(libc::EACCES) => "EACCES",
        Some(libc::EOPNOTSUPP) => "EOPNOTSUPP",
        _ => return e.to_string(),
    };
    let text = e.to_string();
    let text = text.split(" (os error").next().unwrap_or(&text).to_string();
    format!("{name} ({text})")
}

/// RLIMIT_MEMLOCK as (soft, hard) in bytes; `None` means unlimited.
pub fn memlock_bytes() -> io::Result<(Option<u64>, Option<u64>)> {
    let mut limit = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: getrlimit writes one rlimit into the struct we own.
    let rc = unsafe { libc::getrlimit(libc::RLIMIT_MEMLOCK, &mut limit) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    let bytes = |v: libc::rlim_t| if v == libc::RLIM_INFINITY { None } else { Some(v) };
    Ok((bytes(limit.rlim_cur), bytes(limit.rlim_max)))
}

/// CPUs in this process's affinity mask.
pub fn affinity_cpus() -> io::Result<Vec<usize>> {
    // SAFETY: cpu_set_t is plain data; zeroed is the empty set.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    // SAFETY: the kernel writes at most size_of::<cpu_set_t>() bytes into set.
    let rc = unsafe { libc::sched_getaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &mut set) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    let max = 8 * std::mem::size_of::<libc::cpu_set_t>();
    // SAFETY: CPU_ISSET reads the set we own; i is below CPU_SETSIZE.
    Ok((0..max).filter(|&i| unsafe { libc::CPU_ISSET(i, &set) }).collect())
}

/// NIC ring sizes from `ETHTOOL_GRINGPARAM`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RingParams {
    /// Configured RX descriptors.
    pub rx_pending: u32,
    /// Largest RX ring the NIC allows.
    pub rx_max_pending: u32,
    /// Configured TX descriptors.
    pub tx_pending: u32,
    /// Largest TX ring the NIC allows.
    pub tx_max_pending: u32,
}

#[repr(C)]
#[derive(Default)]
struct EthtoolRingparam {
    cmd: u32,
    rx_max_pending: u32,
    rx_mini_max_pending: u32,
    rx_jumbo_max_pending: u32,
    tx_max_pending: u32,
    rx_pending: u32,
    rx_mini_pending: u32,
    rx_jumbo_pending: u32,
    tx_pending: u32,
}

#[repr(C)]
struct IfreqData {
    name: [libc::c_char; libc::IFNAMSIZ],
    data: *mut libc::c_void,
    _pad: [u8; 16],
}

const SIOCETHTOOL: libc::c_ulong = 0x8946;
const ETHTOOL_GRINGPARAM: u32 = 0x10;

/// Reads ring sizes with the ethtool ioctl, as `ethtool -g` does.
pub fn ring_params(interface: &str) -> io::Result<RingParams> {
    let name = CString::new(interface).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    let bytes = name.as_bytes_with_nul();
    if bytes.len() > libc::IFNAMSIZ {
        return Err(io::Error::from(io::ErrorKind::InvalidInput));
    }
    let mut ring = EthtoolRingparam { cmd: ETHTOOL_GRINGPARAM, ..Default::default() };
    let mut req =
        IfreqData { name: [0; libc::IFNAMSIZ], data: (&mut ring as *mut EthtoolRingparam).cast(), _pad: [0; 16] };
    for (dst, src) in req.name.iter_mut().zip(bytes) {
        *dst = *src as libc::c_char;
    }
    // SAFETY: plain socket(2) call; the fd is closed below.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: req points at a valid ifreq whose data points at ring, both
    // alive for the duration of the call.
    let rc = unsafe { libc::ioctl(fd, SIOCETHTOOL as _, &mut req) };
    let err = io::Error::last_os_error();
    // SAFETY: fd is ours and closed once.
    unsafe { libc::close(fd) };
    if rc < 0 {
        return Err(err);
    }
    Ok(RingParams {
        rx_pending: ring.rx_pending,
        rx_max_pending: ring.rx_max_pending,
        tx_pending: ring.tx_pending,
        tx_max_pending: ring.tx_max_pending,
    })
}

/// `statfs(2)` filesystem magic of a path.
pub fn fs_magic(path: &Path) -> io::Result<i64> {
    use std::os::unix::ffi::OsStrExt;
    let c = CString::new(path.as_os_str().as_bytes()).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    // SAFETY: statfs is plain data; zeroed is valid.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: c is a valid NUL-terminated path; st is ours.
    let rc = unsafe { libc::statfs(c.as_ptr(), &mut st) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    #[allow(clippy::unnecessary_cast)]
    Ok(st.f_type as i64)
}

/// `TMPFS_MAGIC` from linux/magic.h.
pub const TMPFS_MAGIC: i64 = 0x0102_1994;

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    #[test]
    fn errno_text_names_the_code() {
        let e = io::Error::from_raw_os_error(libc::EPERM);
        assert_eq!(describe_errno(&e), "EPERM (Operation not permitted)");
    }
}
