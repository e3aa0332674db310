"""elm_jax/files.py: failed writes named in one line with nothing lost, outputs that are
devices written in place, and outputs inside what a command reads refused.

The full disk is real: a small tmpfs mounted in the test's directory and filled to its last
page (skipped where mounting is not allowed)."""

from __future__ import annotations

import errno
import json
import os
import stat
import subprocess

import numpy as np
import pytest
from safetensors.numpy import save_file

from elm_jax import files


@pytest.fixture
def full_disk(tmp_path):
  """A filled tmpfs holding old/file.txt and old_dir/a.txt (written before it was filled)."""
  directory = str(tmp_path / "disk")
  os.makedirs(directory)
  done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", directory],
                        capture_output=True, text=True)
  if done.returncode:
    pytest.skip(f"cannot mount a small tmpfs to fill ({done.stderr.strip()})")
  try:
    os.makedirs(os.path.join(directory, "old_dir"))
    for name in ("file.txt", os.path.join("old_dir", "a.txt")):
      with open(os.path.join(directory, name), "w") as f:
        f.write("old")
    descriptor = os.open(os.path.join(directory, "filler"), os.O_WRONLY | os.O_CREAT)
    with pytest.raises(OSError, match="No space left"):
      while True:
        os.write(descriptor, b"\0" * 65536)
    os.close(descriptor)
    yield directory
  finally:
    if subprocess.run(["umount", directory], capture_output=True).returncode:
      subprocess.run(["umount", "-l", directory], capture_output=True)


def listing(directory: str) -> list[str]:
  return sorted(os.path.relpath(os.path.join(base, n), directory)
                for base, dirs, names in os.walk(directory) for n in dirs + names)


def test_write_atomically_on_a_full_disk(full_disk):
  before = listing(full_disk)
  path = os.path.join(full_disk, "file.txt")
  with pytest.raises(files.FileCheckError) as raised:
    files.write_atomically(path, b"x" * 12_345)
  assert str(raised.value) == f"{path}: no space left on device writing 12.3 kB; the old file is kept"
  with pytest.raises(files.FileCheckError, match="new.txt: no space left on device writing 5 bytes; "
                                                 "nothing was written"):
    files.write_atomically(os.path.join(full_disk, "new.txt"), b"12345")
  assert listing(full_disk) == before and open(path).read() == "old"


def test_atomic_directory_on_a_full_disk(full_disk):
  """safetensors (Rust) reports the OS error only in its message; it is named all the same."""
  before = listing(full_disk)
  target = os.path.join(full_disk, "old_dir")
  with pytest.raises(files.FileCheckError) as raised:
    with files.atomic_directory(target, replace=True) as tmp:
      save_file({"w": np.zeros(100_000, np.float32)}, os.path.join(tmp, "tensors.safetensors"))
  assert str(raised.value).startswith(f"{target}: no space left on device; the old directory is kept")
  with pytest.raises(files.FileCheckError) as raised:
    with files.atomic_directory(os.path.join(full_disk, "new_dir")) as tmp:
      with open(os.path.join(tmp, "meta.json"), "w") as f:
        json.dump({"x": "y" * 100_000}, f)
  assert str(raised.value) == f"{full_disk}/new_dir: no space left on device; nothing was written"
  assert listing(full_disk) == before and open(os.path.join(target, "a.txt")).read() == "old"


def test_other_errors_in_a_directory_being_filled_pass_through(tmp_path):
  with pytest.raises(FileNotFoundError):
    with files.atomic_directory(str(tmp_path / "d")) as tmp:
      with open(os.path.join(tmp, "nowhere", "x"), "w"):
        pass
  assert os.listdir(tmp_path) == []


def test_describe_write_error():
  source = __file__
  copy = OSError(errno.ENOSPC, "No space left on device", source, None, "/lib/experts/x/y")
  assert files.describe_write_error(copy) == (
      f"/lib/experts/x/y: no space left on device writing {files.size_text(os.path.getsize(source))}")
  assert files.describe_write_error(OSError(errno.EROFS, "Read-only file system", "/ro/h")) == (
      "/ro/h: cannot be written (Read-only file system)")
  assert files.describe_write_error(OSError(errno.ENOENT, "No such file", "/x")) is None
  assert files.describe_write_error(ValueError("x")) is None
  assert [files.size_text(n) for n in (1, 999, 1000, 1_234_567)] == ["1 byte", "999 bytes", "1.0 kB", "1.2 MB"]


def test_write_output_to_a_fifo_and_a_device(tmp_path):
  fifo = str(tmp_path / "pipe")
  os.mkfifo(fifo)
  reader = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)  # a reader, so the writer's open returns
  files.write_output(fifo, b"through the pipe")
  assert os.read(reader, 100) == b"through the pipe"
  os.close(reader)
  assert stat.S_ISFIFO(os.lstat(fifo).st_mode)
  before = os.lstat("/dev/null")
  files.check_output_file("/dev/null", "--output")
  files.write_output("/dev/null", b"discarded")
  after = os.lstat("/dev/null")
  assert (after.st_mode, after.st_ino, after.st_rdev) == (before.st_mode, before.st_ino, before.st_rdev)
  with pytest.raises(files.FileCheckError, match=r"^/dev/full: no space left on device writing 3 bytes$"):
    files.write_output("/dev/full", b"abc")


def test_a_block_device_output_is_refused(tmp_path):
  node = str(tmp_path / "disk0")
  try:
    os.mknod(node, stat.S_IFBLK | 0o600, os.makedev(7, 0))
  except PermissionError:
    pytest.skip("making a device node needs root (CAP_MKNOD)")
  with pytest.raises(files.FileCheckError, match=r"--output=.*disk0: is a block device; expected a file"):
    files.check_output_file(node, "--output")
  with pytest.raises(files.FileCheckError, match=r"disk0: is a block device"):
    files.write_output(node, b"x")
  assert stat.S_ISBLK(os.lstat(node).st_mode)


def test_outputs_inside_what_a_command_reads(tmp_path):
  lib, ckpt, elsewhere = tmp_path / "lib", tmp_path / "ckpt", tmp_path / "out"
  for d in (lib, ckpt, elsewhere):
    d.mkdir()
  (lib / "manifest.json").write_text(json.dumps({"backbone_checkpoint": str(ckpt)}))
  read = files.directories_read(str(lib))
  assert read == [(str(lib), "the expert library"), (str(ckpt), "the library's backbone checkpoint")]
  with pytest.raises(files.FileCheckError, match=r"--output=.*lib/manifest.json: is inside the expert "
                                                 r"library .*lib, which this command reads"):
    files.check_output_file(str(lib / "manifest.json"), "--output", within=read)
  with pytest.raises(files.FileCheckError, match="is inside the library's backbone checkpoint"):
    files.check_output_file(str(ckpt / "config.json"), "--output", within=read)
  os.symlink(lib, tmp_path / "link")  # the same library under another name
  with pytest.raises(files.FileCheckError, match="is inside the expert library"):
    files.check_output_file(str(tmp_path / "link" / "x.jsonl"), "--output", within=read)
  with pytest.raises(files.FileCheckError, match="--output_dir=.*lib/eval: is inside"):
    files.check_output_dir(str(lib / "eval"), "--output_dir", within=read)
  files.check_output_file(str(elsewhere / "o.jsonl"), "--output", within=read)
  files.check_output_dir(str(elsewhere / "eval"), "--output_dir", within=read)
  assert files.directories_read(str(lib), str(elsewhere)) == [
      (str(lib), "the expert library"), (str(elsewhere), "the checkpoint")]
  (lib / "manifest.json").write_text("{not json")
  assert files.directories_read(str(lib)) == [(str(lib), "the expert library")]
