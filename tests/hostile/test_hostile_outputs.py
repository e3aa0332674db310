"""Hostile outputs: where a command's results go, and what happens when they cannot be written.

- Outputs that are not regular files (a character device such as /dev/null or /dev/full, a
  FIFO, /dev/stdout) are written in place, never replaced by the atomic rename: the node is the
  same node afterwards. Most cases use device nodes made in the test's own directory (`mknod`,
  as root) or FIFOs; the cases on the real /dev/null, /dev/full and /dev/stdout run with
  `os.replace` and `os.rename` refusing any destination under /dev or /proc, so code that would
  replace them fails the test before it does any damage.
- An output inside a directory the command reads (the expert library, the checkpoint, the
  backbone the library records) is refused before any work.
- A full disk (a real one: a small tmpfs filled to the last page, mounted inside the test's
  directory; skipped where mounting is not allowed) while `score`, `embed`, `retrieve`,
  `library add`, `library remove` or `merge` writes: one line naming the file and the bytes it
  needed, nothing already written changed, no temporary file left behind.
- A checkpoint file that cannot be read (mode 000) is named with "Permission denied".

Each case runs through `harness.run_case` (one error line naming the problem, no traceback,
every pre-existing file byte-identical and nothing new left behind).
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import stat
import subprocess
import sys
import threading

import pytest

from elm_jax.commands import cli
from tests.hostile.harness import REPO, TASKS, Case, World, lib_arg, run_case

_MOUNTS: list[str] = []          # tmpfs mounts made by this module's cases (unmounted after each)
_NODES: dict[str, tuple] = {}    # special files made by a case -> (mode, rdev, inode)
_READERS: list[threading.Thread] = []
_FIFO_DATA: dict[str, bytes] = {}


@pytest.fixture(autouse=True)
def _cleanup():
  yield
  for thread in _READERS:
    thread.join(timeout=60)
  _READERS.clear()
  while _MOUNTS:
    mount = _MOUNTS.pop()
    if subprocess.run(["umount", mount], capture_output=True).returncode:
      subprocess.run(["umount", "-l", mount], capture_output=True)
  _NODES.clear()
  _FIFO_DATA.clear()


@pytest.fixture
def system_nodes_guarded(monkeypatch):
  """os.replace / os.rename refuse any destination under /dev or /proc (what replacing the
  system's /dev/null would take), so the old behaviour fails here instead of doing damage."""
  for name in ("replace", "rename"):
    real = getattr(os, name)

    def guarded(src, dst, *args, _real=real, **kwargs):
      if os.path.abspath(os.fspath(dst)).startswith(("/dev/", "/proc/")):
        raise AssertionError(f"{dst}: a system node would have been replaced")
      return _real(src, dst, *args, **kwargs)
    monkeypatch.setattr(os, name, guarded)
  before = {p: os.lstat(p) for p in ("/dev/null", "/dev/full", "/dev/stdout")}
  yield
  for path, was in before.items():
    now = os.lstat(path)
    assert (now.st_mode, now.st_ino, now.st_rdev) == (was.st_mode, was.st_ino, was.st_rdev), path


# ---------------------------------------------------------------------------- world helpers
def _record(path: str) -> str:
  st = os.lstat(path)
  _NODES[path] = (st.st_mode, st.st_rdev, st.st_ino)
  return path


def char_device(w: World, name: str, minor: int) -> str:
  """A character device in the world: minor 3 is what /dev/null is, 7 what /dev/full is."""
  path = w.path(name)
  try:
    os.mknod(path, stat.S_IFCHR | 0o666, os.makedev(1, minor))
  except PermissionError:
    pytest.skip("making a device node needs root (CAP_MKNOD)")
  return _record(path)


def fifo_with_reader(w: World, name: str) -> str:
  """A FIFO in the world with a thread reading everything written to it."""
  path = w.path(name)
  os.mkfifo(path)

  def read():
    with open(path, "rb") as f:
      _FIFO_DATA[path] = f.read()
  thread = threading.Thread(target=read, daemon=True)
  thread.start()
  _READERS.append(thread)
  return _record(path)


def full_disk(w: World, name: str = "disk", size: str = "4m", fill: bool = True, setup=None) -> str:
  """A tmpfs mounted at `name` in the world; `setup(directory)` puts files on it, then (with
  `fill`) a filler file takes every page left, so the next write gets ENOSPC."""
  directory = w.path(name)
  os.makedirs(directory)
  done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size},mode=755", "tmpfs", directory],
                        capture_output=True, text=True)
  if done.returncode:
    pytest.skip(f"cannot mount a small tmpfs to fill ({done.stderr.strip()})")
  _MOUNTS.append(directory)
  if setup is not None:
    setup(directory)
  if fill:
    descriptor = os.open(os.path.join(directory, "filler"), os.O_WRONLY | os.O_CREAT, 0o644)
    try:
      while True:
        os.write(descriptor, b"\0" * 65536)
    except OSError as e:
      assert e.errno == errno.ENOSPC, e
    finally:
      os.close(descriptor)
  return directory


def examples_args(w: World) -> list[str]:
  return [lib_arg(w), f"--input={w.examples()}"]


def backbone(w: World) -> str:
  return os.path.join(w.run_dir(), "backbone")


def lines(w: World, text: str = "a good film\nthe weather\n") -> str:
  return w.write("t.txt", text)


# ---------------------------------------------------------------------------- special outputs
SPECIAL_CASES = [
    Case("score: --output a character device like /dev/null is written through",
         lambda w: ["score", *examples_args(w), f"--output={char_device(w, 'null', 3)}"], status=0),
    Case("score: --output a character device like /dev/full: no space left on device",
         lambda w: ["score", *examples_args(w), f"--output={char_device(w, 'full', 7)}"],
         message=r"error: .*world/full: no space left on device writing \d+ bytes$"),
    Case("score: --output a FIFO with a reader",
         lambda w: ["score", *examples_args(w), f"--output={fifo_with_reader(w, 'pipe')}"], status=0),
    Case("embed: --output a character device like /dev/null is written through",
         lambda w: ["embed", f"--input={lines(w)}", f"--output={char_device(w, 'null', 3)}"], status=0),
    Case("embed: --output a character device like /dev/full: no space left on device",
         lambda w: ["embed", f"--input={lines(w)}", f"--output={char_device(w, 'full', 7)}"],
         message=r"error: .*world/full: no space left on device writing [\d.]+ (bytes|kB)$"),
    Case("embed: --output a FIFO with a reader gets the .npy",
         lambda w: ["embed", f"--input={lines(w)}", f"--output={fifo_with_reader(w, 'pipe')}"], status=0),
    Case("retrieve: --output a character device like /dev/null is written through",
         lambda w: ["retrieve", lib_arg(w), "--task=builtin_sentiment_rate_review", "--embedder=bm25",
                    f"--output={char_device(w, 'null', 3)}"], status=0, stdout=r"1\tbuiltin_"),
    Case("score: --output a socket is refused before any work",
         lambda w: (_socket(w.path("sock")), ["score", *examples_args(w), f"--output={w.path('sock')}"])[1],
         message=r"--output=.*/sock: is a socket; expected a file name to write"),
]


def _socket(path: str) -> None:
  import socket
  server = socket.socket(socket.AF_UNIX)
  server.bind(path)
  server.close()


@pytest.mark.parametrize("case", SPECIAL_CASES, ids=[c.name for c in SPECIAL_CASES])
def test_special_output(case: Case, made, tmp_path, capsys):
  run_case(case, made, tmp_path, capsys)
  for path, (mode, rdev, inode) in _NODES.items():
    now = os.lstat(path)
    assert (now.st_mode, now.st_rdev, now.st_ino) == (mode, rdev, inode), f"{path} was replaced"
  for thread in _READERS:
    thread.join(timeout=60)
  for path, data in _FIFO_DATA.items():
    if "score" in case.name:
      assert [json.loads(line)["id"] for line in data.decode().splitlines()] == [0, 1]
    else:
      assert data.startswith(b"\x93NUMPY")


@pytest.mark.parametrize("command", ["score", "embed"])
def test_system_dev_null_and_dev_full(command, made, tmp_path, capsys, system_nodes_guarded):
  """The real /dev/null takes the output and stays a character device; the real /dev/full
  fails with one line (the guard fails the test before either could be replaced)."""
  world = World(str(tmp_path), str(made))
  source = ([lib_arg(world), f"--input={world.examples()}"] if command == "score"
            else [f"--input={lines(world)}"])
  assert stat.S_ISCHR(os.stat("/dev/null").st_mode)
  assert cli.main([command, *source, "--output=/dev/null"]) == 0
  assert stat.S_ISCHR(os.stat("/dev/null").st_mode)
  capsys.readouterr()
  assert cli.main([command, *source, "--output=/dev/full"]) == 2
  err = capsys.readouterr().err
  assert "Traceback" not in err
  errors = [line for line in err.splitlines() if "error:" in line]
  assert len(errors) == 1 and f"{command}: error: /dev/full: no space left on device writing" in errors[0], err
  assert stat.S_ISCHR(os.stat("/dev/full").st_mode)


def test_dev_stdout_prints_the_results(made, tmp_path, capfd, system_nodes_guarded):
  """`--output=/dev/stdout` prints the JSON lines to this process's standard output."""
  world = World(str(tmp_path), str(made))
  status = cli.main(["score", lib_arg(world), f"--input={world.examples()}", "--output=/dev/stdout"])
  out, err = capfd.readouterr()
  assert status == 0, err
  records = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
  assert [r["id"] for r in records] == [0, 1] and set(records[0]["scores"]) == set(TASKS)
  assert os.path.islink("/dev/stdout")


# ---------------------------------------------------------------------------- outputs inside inputs
def _expert_json(w: World) -> str:
  return os.path.join(w.library(), "experts", TASKS[0], "expert.json")


INSIDE_CASES = [
    Case("score: --output=LIB/manifest.json (used to overwrite the manifest)",
         lambda w: ["score", *examples_args(w), f"--output={os.path.join(w.library(), 'manifest.json')}"],
         message=r"--output=.*lib/manifest.json: is inside the expert library .*lib, which this command reads"),
    Case("score: --output=LIB/experts/X/expert.json (used to overwrite an expert's record)",
         lambda w: ["score", *examples_args(w), f"--output={_expert_json(w)}"],
         message=r"--output=.*expert.json: is inside the expert library"),
    Case("score: --output=LIB/new.jsonl, a new file inside the library",
         lambda w: ["score", *examples_args(w), f"--output={os.path.join(w.library(), 'new.jsonl')}"],
         message=r"--output=.*lib/new.jsonl: is inside the expert library"),
    Case("score: --output=CHECKPOINT/config.json with --checkpoint",
         lambda w: ["score", *examples_args(w), f"--checkpoint={backbone(w)}",
                    f"--output={os.path.join(backbone(w), 'config.json')}"],
         message=r"--output=.*backbone/config.json: is inside the checkpoint .*backbone, which this command reads"),
    Case("score: --output=CHECKPOINT/config.json without a library",
         lambda w: ["score", f"--input={w.examples()}", f"--checkpoint={backbone(w)}",
                    f"--output={os.path.join(backbone(w), 'config.json')}"],
         message=r"--output=.*backbone/config.json: is inside the checkpoint"),
    Case("score: --output inside the backbone checkpoint the library records",
         lambda w: ["score", *examples_args(w), f"--output={os.path.join(w.made, 'run', 'backbone', 'config.json')}"],
         message=r"--output=.*backbone/config.json: is inside the library's backbone checkpoint"),
    Case("embed: --output inside the --checkpoint of --embedder=t5",
         lambda w: ["embed", "--embedder=t5", f"--checkpoint={backbone(w)}", f"--input={lines(w)}",
                    f"--output={os.path.join(backbone(w), 'x.npy')}"],
         message=r"--output=.*backbone/x.npy: is inside the checkpoint"),
    Case("retrieve: --output=LIB/ranking.json",
         lambda w: ["retrieve", lib_arg(w), "--task=builtin_sentiment_rate_review", "--embedder=bm25",
                    f"--output={os.path.join(w.library(), 'ranking.json')}"],
         message=r"--output=.*lib/ranking.json: is inside the expert library"),
    Case("eval: --output_dir=LIB/eval",
         lambda w: ["eval", lib_arg(w), "--task=builtin_nli_gpt3_style",
                    f"--output_dir={os.path.join(w.library(), 'eval')}"],
         message=r"--output_dir=.*lib/eval: is inside the expert library"),
    Case("eval: --output_dir=LIB/experts --overwrite",
         lambda w: ["eval", lib_arg(w), "--task=builtin_nli_gpt3_style", "--overwrite",
                    f"--output_dir={os.path.join(w.library(), 'experts')}"],
         message=r"--output_dir=.*lib/experts: is inside the expert library"),
    Case("eval: --output_dir inside --checkpoint",
         lambda w: ["eval", lib_arg(w), "--task=builtin_nli_gpt3_style", f"--checkpoint={backbone(w)}",
                    f"--output_dir={os.path.join(backbone(w), 'eval')}"],
         message=r"--output_dir=.*backbone/eval: is inside the checkpoint"),
]


@pytest.mark.parametrize("case", INSIDE_CASES, ids=[c.name for c in INSIDE_CASES])
def test_output_inside_what_the_command_reads(case: Case, made, tmp_path, capsys):
  run_case(case, made, tmp_path, capsys)


# ---------------------------------------------------------------------------- full disks
def _library_on(directory: str, w: World) -> None:
  shutil.copytree(w.library(), os.path.join(directory, "lib"))


def _old_output(directory: str) -> None:
  with open(os.path.join(directory, "o.jsonl"), "w") as f:
    f.write('{"id": 0, "old": true}\n')


def disk_lib(w: World) -> str:
  return "--library=" + os.path.join(w.path("disk"), "lib")


DISK_CASES = [
    Case("score: a full disk under --output keeps the old output",
         lambda w: (full_disk(w, setup=_old_output),
                    ["score", *examples_args(w), f"--output={w.path('disk', 'o.jsonl')}"])[1],
         message=r"disk/o.jsonl: no space left on device writing [\d.]+ (bytes|kB); the old file is kept"),
    Case("embed: a full disk under --output",
         lambda w: (full_disk(w), ["embed", f"--input={lines(w)}", f"--output={w.path('disk', 'x.npy')}"])[1],
         message=r"disk/x.npy: no space left on device writing [\d.]+ (bytes|kB); nothing was written"),
    Case("retrieve: a full disk under --output",
         lambda w: (full_disk(w), ["retrieve", lib_arg(w), "--task=builtin_sentiment_rate_review",
                                   "--embedder=bm25", f"--output={w.path('disk', 'r.json')}"])[1],
         message=r"disk/r.json: no space left on device writing [\d.]+ (bytes|kB)"),
    Case("library add: a full disk under the library",
         lambda w: (full_disk(w, setup=lambda d: _library_on(d, w)),
                    ["library", "add", disk_lib(w), "--keys=none", "--name=another",
                     os.path.join(w.run_dir(), "experts", TASKS[0])])[1],
         message=r"disk/lib/.*: no space left on device"),
    Case("library remove: a full disk under the library removes nothing",
         lambda w: (full_disk(w, setup=lambda d: _library_on(d, w)),
                    ["library", "remove", disk_lib(w), TASKS[0]])[1],
         message=r"disk/lib/.*: no space left on device"),
    Case("merge: a full disk under the library",
         lambda w: (full_disk(w, setup=lambda d: _library_on(d, w)),
                    ["merge", disk_lib(w), f"--experts={','.join(TASKS)}", "--name=merged"])[1],
         message=r"disk/lib/.*: no space left on device"),
]


@pytest.mark.parametrize("case", DISK_CASES, ids=[c.name for c in DISK_CASES])
def test_full_disk(case: Case, made, tmp_path, capsys):
  run_case(case, made, tmp_path, capsys)


# ---------------------------------------------------------------------------- unreadable checkpoints
def _unreadable_checkpoint(w: World) -> str:
  """A copy of the backbone whose model.safetensors is mode 000."""
  checkpoint = w.path("ckpt")
  shutil.copytree(os.path.join(w.made, "run", "backbone"), checkpoint)
  os.chmod(os.path.join(checkpoint, "model.safetensors"), 0)
  return checkpoint


def test_unreadable_checkpoint_file_is_named(made, tmp_path, capsys, monkeypatch):
  """Mode 000 on model.safetensors: "cannot be read (Permission denied)", not "No such file".
  Root reads anything, so there `open` raises the PermissionError a user gets, and
  safetensors' `safe_open` fails as it does on such a file (FileNotFoundError, whatever the
  reason)."""
  from elm_jax.checkpoints import hf
  world = World(str(tmp_path / "world"), str(made))
  os.makedirs(world.root)
  checkpoint = _unreadable_checkpoint(world)
  locked = os.path.join(checkpoint, "model.safetensors")
  if os.geteuid() == 0:
    real_open, real_safe_open = open, hf.safe_open

    def locked_open(file, *args, **kwargs):
      if isinstance(file, (str, os.PathLike)) and os.path.abspath(os.fspath(file)) == locked:
        raise PermissionError(errno.EACCES, "Permission denied", os.fspath(file))
      return real_open(file, *args, **kwargs)

    def locked_safe_open(file, *args, **kwargs):
      if os.path.abspath(os.fspath(file)) == locked:
        raise FileNotFoundError(f"No such file or directory: {file}")
      return real_safe_open(file, *args, **kwargs)
    monkeypatch.setattr("builtins.open", locked_open)
    monkeypatch.setattr(hf, "safe_open", locked_safe_open)
  status = cli.main(["score", f"--checkpoint={checkpoint}", f"--input={world.examples()}",
                     f"--output={world.path('o.jsonl')}"])
  err = capsys.readouterr().err
  assert status == 2 and "Traceback" not in err, err
  errors = [line for line in err.splitlines() if "error:" in line]
  assert len(errors) == 1 and errors[0].endswith(f"{locked}: cannot be read (Permission denied)"), err
  assert not os.path.exists(world.path("o.jsonl"))


@pytest.mark.skipif(os.geteuid() != 0 or shutil.which("setpriv") is None,
                    reason="needs root and setpriv to run without the file-permission override")
def test_unreadable_checkpoint_without_root_override(made, tmp_path):
  """The same without any simulation: a process of root's without CAP_DAC_OVERRIDE and
  CAP_DAC_READ_SEARCH is refused the mode-000 file as any user is."""
  world = World(str(tmp_path), str(made))
  checkpoint = _unreadable_checkpoint(world)
  code = ("from elm_jax.checkpoints import loading, hf\n"
          "try:\n"
          f"  loading.load_model_checkpoint({checkpoint!r})\n"
          "except hf.CheckpointError as e:\n"
          "  print(e)\n")
  caps = "-dac_override,-dac_read_search"
  done = subprocess.run(["setpriv", f"--inh-caps={caps}", f"--bounding-set={caps}", sys.executable, "-c", code],
                        cwd=REPO, capture_output=True, text=True, timeout=300,
                        env={**os.environ, "JAX_PLATFORMS": "cpu"})
  assert done.returncode == 0, done.stderr
  assert done.stdout.strip() == f"{checkpoint}/model.safetensors: cannot be read (Permission denied)", done.stdout
