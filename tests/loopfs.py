"""A small ext4 filesystem on a loop device, for tests that need a disk to
fill up, fail or lose power for real.

- `fill()` takes its free space away with one preallocated file;
- `shutdown()` is ext4's EXT4_IOC_SHUTDOWN (xfstests' "godown"): from then on
  every read and write in it fails with EIO, as a dead disk does; with
  `flush_log=False` (the default) nothing that was not yet committed reaches
  the device, so after `remount()` the filesystem holds exactly what was made
  durable (fsync/fdatasync, directory fsync) before: dirty page-cache data,
  size changes, extent conversions after O_DIRECT writes and directory
  entries that were never synced are gone. That is a power loss as the
  filesystem sees it. What it cannot drop is a write the device already got
  but had not flushed from a volatile write cache (the loop device has none),
  so it says nothing about FUA/flush ordering inside a real disk.

Needs root, losetup, mkfs.ext4 and mount; `unavailable()` says why not.
"""

import contextlib
import fcntl
import os
import shutil
import struct
import subprocess
import time

import pytest

# _IOR('X', 125, __u32): FS_IOC_GOINGDOWN / EXT4_IOC_SHUTDOWN.
GOINGDOWN = 0x8004587D
GOINGDOWN_LOGFLUSH = 1  # commit the journal first, drop nothing already written
GOINGDOWN_NOLOGFLUSH = 2  # drop everything not committed: a power loss


def unavailable():
    """Why a loop filesystem cannot be used here, or None."""
    if os.geteuid() != 0:
        return "needs root to mount a loop filesystem"
    for tool in ("losetup", "mkfs.ext4", "mount", "umount"):
        if shutil.which(tool) is None:
            return "%s is not installed" % tool
    return None


class LoopFs:
    def __init__(self, base, size_mb):
        self.image = base + ".img"
        self.mnt = base + ".mnt"
        self.size_mb = size_mb
        self.mounted = False

    def create(self):
        os.makedirs(self.mnt, exist_ok=True)
        with open(self.image, "wb") as f:
            f.truncate(self.size_mb << 20)
        subprocess.run(["mkfs.ext4", "-q", "-F", "-m", "0", self.image], check=True)
        self.mount()

    def mount(self):
        r = subprocess.run(["mount", "-o", "loop", self.image, self.mnt], capture_output=True, text=True)
        if r.returncode != 0:
            raise OSError("mount -o loop %s failed: %s" % (self.image, r.stderr.strip()))
        self.mounted = True

    def umount(self):
        for _ in range(50):
            r = subprocess.run(["umount", self.mnt], capture_output=True, text=True)
            if r.returncode == 0:
                self.mounted = False
                return
            time.sleep(0.1)
        raise OSError("umount %s failed: %s" % (self.mnt, r.stderr.strip()))

    def remount(self):
        """Unmount (after a shutdown: the journal is replayed at mount) and mount again."""
        self.umount()
        self.mount()

    def shutdown(self, flush_log=False):
        """Every I/O in the filesystem fails with EIO from now on (see the module doc)."""
        fd = os.open(self.mnt, os.O_RDONLY)
        try:
            flag = GOINGDOWN_LOGFLUSH if flush_log else GOINGDOWN_NOLOGFLUSH
            fcntl.ioctl(fd, GOINGDOWN, struct.pack("I", flag))
        finally:
            os.close(fd)

    def fill(self, leave_bytes):
        """Fills the filesystem with one file, leaving about `leave_bytes` free. Returns its path."""
        filler = os.path.join(self.mnt, "filler")
        st = os.statvfs(self.mnt)
        size = max(0, st.f_bavail * st.f_frsize - leave_bytes)
        fd = os.open(filler, os.O_CREAT | os.O_WRONLY, 0o644)
        try:
            os.posix_fallocate(fd, 0, size)
        finally:
            os.close(fd)
        return filler

    def destroy(self):
        if self.mounted:
            subprocess.run(["umount", "-l", self.mnt])
            self.mounted = False
        for p in (self.image,):
            try:
                os.unlink(p)
            except OSError:
                pass
        try:
            os.rmdir(self.mnt)
        except OSError:
            pass


@contextlib.contextmanager
def mounted(data_root, prefix, size_mb):
    """A fresh LoopFs of `size_mb` under `data_root`, destroyed afterwards;
    skips the calling test (with the reason) where loop filesystems cannot
    be used. For fixtures: `with loopfs.mounted(...) as fs: yield fs`."""
    why = unavailable()
    if why:
        pytest.skip(why)
    fs = LoopFs(os.path.join(data_root, "%s-%d-%d" % (prefix, os.getpid(), time.monotonic_ns())), size_mb)
    try:
        fs.create()
    except OSError as e:
        fs.destroy()
        pytest.skip("cannot mount a loop filesystem here: %s" % e)
    try:
        yield fs
    finally:
        fs.destroy()
