"""A data dir on tmpfs cannot do O_DIRECT: the broker refuses to start, at
once, and says why and what to use instead."""

import os
import subprocess
import tempfile

import pytest

from conftest import REPO, fs_type, pick_ports


@pytest.fixture
def tmpfs_dir():
    base = tempfile.mkdtemp(prefix="tidelog-tmpfs-", dir=os.path.join(REPO, "target") if os.path.isdir(os.path.join(REPO, "target")) else None)
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs", base], capture_output=True)
    if r.returncode != 0:
        os.rmdir(base)
        pytest.skip("cannot mount a tmpfs here (needs root and mount rights): %s" % r.stderr.decode().strip())
    try:
        assert fs_type(base) == "tmpfs"
        yield base
    finally:
        subprocess.run(["umount", base], check=False)
        os.rmdir(base)


def check_refusal(r):
    out = (r.stdout + r.stderr).decode("utf-8", "replace")
    assert r.returncode is not None and r.returncode > 0, "exit code %r (want a non-zero exit, not a signal)\n%s" % (r.returncode, out)
    low = out.lower()
    assert "o_direct" in low, "no mention of O_DIRECT:\n%s" % out
    assert "tmpfs" in low, "no mention of tmpfs:\n%s" % out
    assert "xfs" in low or "ext4" in low, "does not suggest XFS or ext4:\n%s" % out


@pytest.mark.parametrize("how", ["flag", "env"])
def test_tmpfs_data_dir_refused(binary, tmpfs_dir, how):
    port = pick_ports(2)
    data = os.path.join(tmpfs_dir, "data")
    cmd = [binary, "--listeners=PLAINTEXT://127.0.0.1:%d" % port, "--num.shards=2"]
    env = dict(os.environ)
    if how == "flag":
        cmd.append("--log.dirs=%s" % data)
    else:
        env["TIDELOG_LOG_DIRS"] = data
    try:
        r = subprocess.run(cmd, capture_output=True, timeout=30, env=env, stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired as e:
        pytest.fail("broker still running 30 s after start on tmpfs (output: %r)" % ((e.stdout or b"") + (e.stderr or b""))[-2000:])
    check_refusal(r)
    assert b"tidelog ready" not in r.stderr + r.stdout
