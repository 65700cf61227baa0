"""Point locks: so that sweeps sharing a workdir never run one point twice.

A claim is the file `point/claim` holding the owner's pid, host and (once launched) the
trainer's pid. It is created complete and atomically: written under a private name, then
`os.link`ed to `claim`, which fails if a claim already exists (atomic on local disks and
on NFS). The owner removes it when the point is finished.

A claim whose owner and trainer pids are both dead on this host is stale (a sweep that
was killed) and may be taken over. Takeovers are serialised by an `flock` on
`point/claim.lock` and re-read the claim under the lock, so of two sweeps finding the same
stale claim only one deletes it, and never a fresh one. A claim from another host is
never judged stale: remove it by hand if its host is gone.
"""
from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import json
import os
import socket
import time
from typing import Any, Optional

CLAIM_FILE = "claim"
_LOCK_FILE = "claim.lock"


@dataclasses.dataclass(frozen=True)
class Owner:
  """Who holds a claim: the sweep process and, once started, its trainer process."""
  pid: int
  host: str
  child_pid: Optional[int] = None
  since: float = 0.0

  def is_stale(self) -> bool:
    """True only when this host can tell that neither process is alive."""
    if self.host != socket.gethostname():
      return False
    return not any(_pid_alive(p) for p in (self.pid, self.child_pid) if p)

  def describe(self) -> str:
    """`pid 123 on host-a` for progress messages."""
    return f"pid {self.pid} on {self.host}"


def acquire(point_dir: str) -> tuple[bool, Optional[Owner]]:
  """Tries to claim a point for this process.

  Returns (True, None) when the claim is now ours, else (False, current owner) — the
  owner is None when the claim file cannot be parsed (it is then left alone).
  """
  os.makedirs(point_dir, exist_ok=True)
  path = os.path.join(point_dir, CLAIM_FILE)
  for _ in range(3):  # create; or take over a stale claim and create again
    if _create(path, Owner(os.getpid(), socket.gethostname(), None, time.time())):
      return True, None
    owner = read(point_dir)
    if owner is None and not os.path.exists(path):
      continue  # released between our attempt and the read
    if owner is None or not owner.is_stale():
      return False, owner
    with _locked(os.path.join(point_dir, _LOCK_FILE)):
      if read(point_dir) == owner:  # still the same stale claim, not a new one
        _unlink(path)
  return False, read(point_dir)


def set_child(point_dir: str, child_pid: int) -> None:
  """Records the trainer's pid in our claim, so a running orphan keeps the claim live."""
  owner = read(point_dir)
  if owner is None or owner.pid != os.getpid():
    raise RuntimeError(f"{point_dir}: set_child on a claim this process does not hold")
  owner = dataclasses.replace(owner, child_pid=child_pid)
  tmp = os.path.join(point_dir, f".{CLAIM_FILE}.{os.getpid()}.tmp")
  _write(tmp, owner)
  os.replace(tmp, os.path.join(point_dir, CLAIM_FILE))


def release(point_dir: str) -> None:
  """Removes our claim (a claim held by someone else is left alone)."""
  owner = read(point_dir)
  if owner is not None and owner.pid == os.getpid() and owner.host == socket.gethostname():
    _unlink(os.path.join(point_dir, CLAIM_FILE))


def read(point_dir: str) -> Optional[Owner]:
  """The current claim's owner, or None when there is no readable claim."""
  try:
    with open(os.path.join(point_dir, CLAIM_FILE)) as f:
      data: Any = json.load(f)
    return Owner(int(data["pid"]), str(data["host"]), data.get("child_pid"),
                 float(data.get("since", 0.0)))
  except (OSError, ValueError, KeyError, TypeError):
    return None


def _create(path: str, owner: Owner) -> bool:
  tmp = f"{path}.{owner.pid}.{time.monotonic_ns()}.tmp"
  _write(tmp, owner)
  try:
    os.link(tmp, path)  # atomic, and fails if the claim exists
    return True
  except FileExistsError:
    return False
  finally:
    _unlink(tmp)


def _write(path: str, owner: Owner) -> None:
  with open(path, "w") as f:
    json.dump(dataclasses.asdict(owner), f)
    f.flush()
    os.fsync(f.fileno())


def _pid_alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:
    return True  # exists, owned by another user
  return True


@contextlib.contextmanager
def _locked(path: str):
  fd = os.open(path, os.O_CREAT | os.O_RDWR, 0o644)
  try:
    fcntl.flock(fd, fcntl.LOCK_EX)  # released by the kernel even if we die
    yield
  finally:
    os.close(fd)


def _unlink(path: str) -> None:
  with contextlib.suppress(FileNotFoundError):
    os.unlink(path)
