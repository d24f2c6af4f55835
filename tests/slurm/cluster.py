"""A throwaway SLURM cluster on localhost: munge + slurmctld + two slurmd "nodes", all state in one temp dir.

    with LocalSlurmCluster(tmp_dir) as cluster:      # or cluster.start() / cluster.stop()
        env = cluster.env                           # SLURM_CONF for sbatch/squeue/scancel/srun
        subprocess.run(["sbatch", ...], env={**os.environ, **env})

* munge runs with its own key and socket (``AuthInfo=socket=...``), so it never touches a system munge,
* both nodes are ``NodeHostname=localhost NodeAddr=127.0.0.1`` with their own slurmd port, spool, log, pid,
* no accounting daemon: ``sacct`` does not work here; job states come from ``squeue`` (see
  :mod:`launchers.executor`),
* every daemon is stopped by the PID we started it with (``stop()``, also from ``__exit__`` and ``atexit``).

A fresh state dir restarts job ids at 1: never reuse a submitit folder across clusters.

Command line (for poking at it by hand): ``python -m tests.slurm.cluster [--dir DIR] [--keep-s SECONDS]``.
"""
from __future__ import annotations

import atexit
import os
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

from pipeline.net import free_port

NODES = ("n1", "n2")
CPUS_PER_NODE = 2
REAL_MEMORY_MB = 4000
PARTITION = "debug"
DAEMONS = ("munged", "slurmctld", "slurmd")
APT_PACKAGES = ("slurm-wlm", "munge")


class ClusterUnavailable(RuntimeError):
    """SLURM cannot be installed/started here (not root, no apt, no binaries): tests skip with this reason."""


def _free_ports(n: int) -> list[int]:
    """``n`` distinct free ports."""
    ports: list[int] = []
    while len(ports) < n:
        if (port := free_port()) not in ports:
            ports.append(port)
    return ports


def ensure_installed() -> None:
    """Install slurm-wlm + munge with apt-get when missing (root only); raise ClusterUnavailable otherwise."""
    if all(shutil.which(d) or Path("/usr/sbin", d).exists() for d in DAEMONS):
        return
    if os.geteuid() != 0:
        raise ClusterUnavailable("slurm-wlm/munge are not installed and installing them needs root")
    if shutil.which("apt-get") is None:
        raise ClusterUnavailable("slurm-wlm/munge are not installed and apt-get is not available")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    install = ["apt-get", "install", "-y", "-qq", "--no-install-recommends", *APT_PACKAGES]
    proc = subprocess.run(install, env=env, capture_output=True, text=True)
    if proc.returncode != 0:  # package lists may be missing on a fresh machine
        subprocess.run(["apt-get", "update", "-qq"], env=env, capture_output=True, text=True)
        proc = subprocess.run(install, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["?"]
        raise ClusterUnavailable(f"apt-get install {' '.join(APT_PACKAGES)} failed: {tail[0]}")


def _binary(name: str) -> str:
    path = shutil.which(name) or str(Path("/usr/sbin", name))
    if not Path(path).exists():
        raise ClusterUnavailable(f"{name} not found after installation")
    return path


class LocalSlurmCluster:
    """See module docstring. ``root`` is created if needed and holds every file the cluster writes."""

    def __init__(self, root: str | Path | None = None, nodes: tuple[str, ...] = NODES,
                 cpus_per_node: int = CPUS_PER_NODE, kill_wait_s: int = 30, cluster_name: str = "cpvt"):
        self.root = Path(root) if root is not None else Path(tempfile.mkdtemp(prefix="slurm-"))
        self.nodes = tuple(nodes)
        self.cpus_per_node = cpus_per_node
        self.kill_wait_s = kill_wait_s
        self.cluster_name = cluster_name
        self.procs: dict[str, int] = {}  # daemon name -> pid we started
        self._popen: dict[str, subprocess.Popen] = {}
        self.conf = self.root / "slurm.conf"
        self.munge_socket = self.root / "munge" / "munge.socket"
        self._started = False

    # ------------------------------------------------------------------------------------------ public API
    @property
    def env(self) -> dict[str, str]:
        """Variables the SLURM client commands (and submitit) need to talk to this cluster."""
        return {"SLURM_CONF": str(self.conf)}

    @property
    def partition(self) -> str:
        return PARTITION

    def run(self, *cmd: str, check: bool = True, timeout: float = 60) -> subprocess.CompletedProcess:
        """Run a SLURM client command against this cluster."""
        proc = subprocess.run(list(cmd), env={**os.environ, **self.env}, capture_output=True, text=True,
                              timeout=timeout)
        if check and proc.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}): {proc.stderr.strip()}")
        return proc

    def start(self, timeout_s: float = 60) -> "LocalSlurmCluster":
        ensure_installed()
        if os.geteuid() != 0:
            raise ClusterUnavailable("a local SLURM cluster needs root (SlurmUser=root, munge key ownership)")
        self.root.mkdir(parents=True, exist_ok=True)
        os.chmod(self.root, 0o755)
        atexit.register(self.stop)
        try:
            self._start_munge()
            self._write_conf()
            self._start_slurmctld()
            for node in self.nodes:
                self._start_slurmd(node)
            self.wait_idle(timeout_s)
        except BaseException:
            self.stop()
            raise
        self._started = True
        return self

    def stop(self) -> None:
        """Stop every daemon we started (by PID): SIGTERM, then SIGKILL after a few seconds."""
        if self.procs and self._cluster_is_up():
            # end jobs first so slurmstepd/task processes do not outlive their slurmd
            subprocess.run(["scancel", "--full", "--quiet", "--partition", PARTITION],
                           env={**os.environ, **self.env}, capture_output=True, timeout=30)
        order = [n for n in self.procs if n.startswith("slurmd")] + ["slurmctld", "munged"]
        for name in order:
            pid = self.procs.pop(name, None)
            if pid is not None:
                _terminate(pid)
        self._kill_stray_steps()
        self.procs.clear()
        atexit.unregister(self.stop)

    def wait_idle(self, timeout_s: float = 60) -> None:
        """Block until every node reports idle (raises with the daemons' log tails otherwise)."""
        deadline = time.time() + timeout_s
        last = ""
        while time.time() < deadline:
            self._check_alive()
            proc = self.run("sinfo", "--noheader", "--node", ",".join(self.nodes), "-o", "%N %t", "-N",
                            check=False)
            last = proc.stdout.strip() or proc.stderr.strip()
            states = dict(line.split() for line in proc.stdout.splitlines() if len(line.split()) == 2)
            if proc.returncode == 0 and all(states.get(n, "").startswith("idle") for n in self.nodes):
                return
            time.sleep(0.5)
        raise RuntimeError(f"SLURM nodes not idle after {timeout_s}s (sinfo: {last!r})\n{self.log_tails()}")

    def log_tails(self, n: int = 15) -> str:
        out = []
        for log in sorted(self.root.glob("*.log")) + sorted((self.root / "munge").glob("*.log")):
            lines = log.read_text(errors="replace").splitlines()[-n:]
            out.append(f"--- {log.name}\n" + "\n".join(lines))
        return "\n".join(out)

    def __enter__(self) -> "LocalSlurmCluster":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # ------------------------------------------------------------------------------------------ daemons
    def _spawn(self, name: str, cmd: list[str], env: dict[str, str] | None = None) -> int:
        log = open(self.root / f"{name}.stdout", "ab")
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                env={**os.environ, **(env or {})}, start_new_session=True)
        log.close()
        self.procs[name] = proc.pid
        self._popen[name] = proc
        return proc.pid

    def _check_alive(self) -> None:
        for name, proc in self._popen.items():
            if name in self.procs and proc.poll() is not None:
                out = (self.root / f"{name}.stdout").read_text(errors="replace")[-2000:]
                raise RuntimeError(f"{name} exited with {proc.returncode}: {out}\n{self.log_tails()}")

    def _start_munge(self) -> None:
        mdir = self.root / "munge"
        mdir.mkdir(mode=0o700, exist_ok=True)
        os.chmod(mdir, 0o700)
        key = mdir / "munge.key"
        if not key.exists():
            key.write_bytes(os.urandom(1024))
        os.chmod(key, 0o400)
        cmd = [_binary("munged"), "--foreground", "--force", f"--socket={self.munge_socket}",
               f"--key-file={key}", f"--pid-file={mdir / 'munged.pid'}", f"--log-file={mdir / 'munged.log'}",
               f"--seed-file={mdir / 'munged.seed'}", "--num-threads=2"]
        self._spawn("munged", cmd)
        deadline = time.time() + 20
        while not self.munge_socket.exists():
            self._check_alive()
            if time.time() > deadline:
                raise RuntimeError(f"munged did not create its socket\n{self.log_tails()}")
            time.sleep(0.1)

    def _start_slurmctld(self) -> None:
        cmd = [_binary("slurmctld"), "-D", "-i", "-f", str(self.conf)]
        self._spawn("slurmctld", cmd, env=self.env)
        deadline = time.time() + 30
        while True:
            self._check_alive()
            if self.run("scontrol", "ping", check=False).stdout.count("UP"):
                return
            if time.time() > deadline:
                raise RuntimeError(f"slurmctld did not answer scontrol ping\n{self.log_tails()}")
            time.sleep(0.3)

    def _start_slurmd(self, node: str) -> None:
        (self.root / "spool" / node).mkdir(parents=True, exist_ok=True)
        cmd = [_binary("slurmd"), "-D", "-N", node, "-f", str(self.conf)]
        self._spawn(f"slurmd-{node}", cmd, env=self.env)

    def _cluster_is_up(self) -> bool:
        try:
            return "UP" in self.run("scontrol", "ping", check=False, timeout=10).stdout
        except (subprocess.SubprocessError, OSError):
            return False

    def _kill_stray_steps(self) -> None:
        """slurmstepd processes of our nodes (they reparent to init when slurmd dies) get SIGKILL."""
        spool = str(self.root / "spool")
        for proc_dir in Path("/proc").iterdir():
            if not proc_dir.name.isdigit():
                continue
            try:
                cmdline = (proc_dir / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
                environ = (proc_dir / "environ").read_bytes()
            except OSError:
                continue
            if cmdline.startswith("slurmstepd") and (spool.encode() in environ or str(self.conf).encode() in
                                                      environ):
                _terminate(int(proc_dir.name), grace_s=0.5)

    # ------------------------------------------------------------------------------------------ config
    def _write_conf(self) -> None:
        ctld_port, *node_ports = _free_ports(1 + len(self.nodes))
        r = self.root
        node_lines = "\n".join(
            f"NodeName={n} NodeHostname=localhost NodeAddr=127.0.0.1 Port={p} CPUs={self.cpus_per_node} "
            f"RealMemory={REAL_MEMORY_MB} State=UNKNOWN"
            for n, p in zip(self.nodes, node_ports))
        self.conf.write_text(f"""\
# throwaway local cluster written by tests/slurm/cluster.py
ClusterName={self.cluster_name}
SlurmctldHost=localhost
SlurmctldPort={ctld_port}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
AuthInfo=socket={self.munge_socket}
CredType=cred/munge
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/backfill
SlurmdParameters=config_overrides
ReturnToService=2
JobRequeue=1
KillWait={self.kill_wait_s}
MinJobAge=300
InactiveLimit=0
MailProg=/bin/true
StateSaveLocation={r / 'state'}
SlurmdSpoolDir={r / 'spool'}/%n
SlurmctldPidFile={r / 'slurmctld.pid'}
SlurmdPidFile={r / 'slurmd-%n.pid'}
SlurmctldLogFile={r / 'slurmctld.log'}
SlurmdLogFile={r / 'slurmd-%n.log'}
SlurmctldDebug=info
SlurmdDebug=info
{node_lines}
PartitionName={PARTITION} Nodes={','.join(self.nodes)} Default=YES MaxTime=INFINITE State=UP OverSubscribe=NO
""")
        (r / "state").mkdir(exist_ok=True)


def _terminate(pid: int, grace_s: float = 5.0) -> None:
    """SIGTERM ``pid`` (its session too, since daemons run in their own), SIGKILL if still alive."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            return
        deadline = time.time() + grace_s
        while time.time() < deadline:
            try:
                done, _ = os.waitpid(pid, os.WNOHANG)
            except ChildProcessError:  # not our child: poll for existence
                try:
                    os.kill(pid, 0)
                except ProcessLookupError:
                    return
                done = 0
            if done == pid:
                return
            time.sleep(0.05)


def main(argv: list[str] | None = None) -> None:
    import argparse

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dir", default=None, help="state dir (default: a new temp dir)")
    p.add_argument("--keep-s", type=float, default=0, help="keep the cluster up this long, then stop it")
    args = p.parse_args(argv)
    with LocalSlurmCluster(args.dir) as cluster:
        print(f"export SLURM_CONF={cluster.conf}")
        print(cluster.run("sinfo").stdout)
        time.sleep(args.keep_s)


if __name__ == "__main__":
    main()
