"""A real Slurm on this machine: munged, slurmctld, and one slurmd per "node".

Each node is a network namespace (ip netns, a veth into one bridge) with its own address, hostname and /etc/hosts,
so a two-node job really spans two hosts: the batch script runs on the first node, srun starts tasks on both, and
the ranks meet over TCP at the master address. The nodes advertise GPUs (copies of /dev/null as device files) so
the project's sbatch scripts run unchanged with --gpus-per-node. Everything the cluster writes lives in one
temporary folder; stop() ends the daemons that start() began, by pid, and removes the network it made.
"""

import os
import re
import shutil
import socket
import stat
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import NoReturn

import pytest

PACKAGES = ["slurmctld", "slurmd", "slurm-client", "munge", "iproute2"]
DONE = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE",
        "PREEMPTED"}


def install_slurm() -> str | None:
    """Install Debian's Slurm and MUNGE when missing. Returns why they cannot be had, or None."""
    if all(shutil.which(tool) for tool in ("slurmctld", "slurmd", "sbatch", "munged", "mungekey", "ip")):
        return None
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        return "Slurm is not installed and there is no apt-get (as root) to install it"
    # RUNLEVEL=1: invoke-rc.d leaves the packages' system services stopped; the tests start daemons of their own.
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive", "RUNLEVEL": "1"}
    install = ["apt-get", "install", "-y", "--no-install-recommends", *PACKAGES]
    if subprocess.run(install, env=env, capture_output=True).returncode != 0:
        subprocess.run(["apt-get", "update"], env=env, capture_output=True)  # a fresh machine has no package lists
        proc = subprocess.run(install, env=env, capture_output=True, text=True)
        if proc.returncode != 0:
            return f"`{' '.join(install)}` failed: {proc.stderr.strip()[-500:]}"
    return None


def setup_failed(reason: str) -> NoReturn:
    """A Slurm that cannot be installed or started fails the run in CI (CI=true), where the Slurm tests must run;
    elsewhere (a user without root, a machine without apt or network namespaces) the Slurm tests skip."""
    if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
        pytest.fail(f"CI=true and Slurm could not be set up: {reason}", pytrace=False)
    pytest.skip(reason)


def start_cluster(num_nodes: int = 2, gpus: int = 2) -> "SlurmCluster":
    """Install Slurm if needed and start a cluster; setup_failed decides what a failure to do so means."""
    reason = install_slurm()
    if reason:
        setup_failed(reason)
    cluster = SlurmCluster(num_nodes=num_nodes, gpus=gpus)
    try:
        cluster.start()
    except NetworkUnavailable as err:
        cluster.stop()
        setup_failed(str(err))
    except BaseException:
        cluster.stop()
        raise
    return cluster


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


class NetworkUnavailable(RuntimeError):
    """This machine cannot make the nodes' network namespaces."""


@dataclass
class Node:
    name: str
    address: str
    netns: str
    veth: str


class SlurmCluster:
    def __init__(self, num_nodes: int = 2, gpus: int = 2) -> None:
        self.root = Path(tempfile.mkdtemp(prefix="moe-slurm-"))  # short: munged's socket path has a length limit
        self.cpus, self.gpus = os.cpu_count(), gpus  # every node has all of this machine's CPUs
        tag = f"ms{os.getpid() % 100000}"  # unique per test session: interface names have at most 15 characters
        subnet = f"10.77.{os.getpid() % 200 + 20}"
        self.bridge, self.controller_address = f"{tag}br", f"{subnet}.1"
        self.nodes = [Node(f"n{i}", f"{subnet}.{10 + i}", f"moe-slurm-{tag}-n{i}", f"{tag}v{i}")
                      for i in range(1, num_nodes + 1)]
        self.processes: list[subprocess.Popen] = []
        self.conf = self.root / "slurm.conf"

    # --- lifecycle -----------------------------------------------------------------------------------------------

    def start(self) -> None:
        self._network()
        self._write_config()
        self._start_munge()
        self._spawn("slurmctld", ["slurmctld", "-D", "-f", str(self.conf)])
        for node in self.nodes:
            # nsenter joins the node's network namespace (ip netns exec would remount /sys, hiding the cgroups
            # slurmd needs); unshare gives the node its own hostname and a private /etc/hosts naming the nodes.
            # Each command execs the next, so the pid we keep is slurmd's.
            self._spawn(f"slurmd-{node.name}", [
                "nsenter", f"--net=/run/netns/{node.netns}", "unshare", "--uts", "--mount", "sh", "-c",
                f'mount --bind "{self.root / "hosts"}" /etc/hosts && hostname {node.name} && '
                f'exec slurmd -D -N {node.name} -f "{self.conf}"'])
        self._wait_for_idle_nodes()

    def stop(self) -> None:
        if self.processes:  # end any job a failed test left behind before its nodes go away
            subprocess.run(["scancel", "--user=root"], env=self.env(), capture_output=True)
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline and subprocess.run(
                    ["squeue", "--noheader"], env=self.env(), capture_output=True, text=True
            ).stdout.strip():
                time.sleep(1)
        for proc in reversed(self.processes):
            proc.terminate()
        for proc in reversed(self.processes):
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        for node in self.nodes:
            subprocess.run(["ip", "netns", "delete", node.netns], capture_output=True)
        subprocess.run(["ip", "link", "delete", self.bridge], capture_output=True)
        shutil.rmtree(self.root, ignore_errors=True)

    # --- jobs ----------------------------------------------------------------------------------------------------

    def env(self, base: dict[str, str] | None = None) -> dict[str, str]:
        """For Slurm clients and for jobs (sbatch exports the submitting environment): our slurm.conf, the venv."""
        env = dict(os.environ if base is None else base)
        env.update(SLURM_CONF=str(self.conf), PATH=f"{Path(sys.executable).parent}:{env['PATH']}")
        return env

    def run(self, *cmd: str, env: dict[str, str] | None = None) -> str:
        proc = subprocess.run(cmd, env=env or self.env(), capture_output=True, text=True, timeout=60)
        if proc.returncode != 0:
            raise AssertionError(f"{' '.join(cmd)} exited {proc.returncode}: {proc.stderr}{self.logs()}")
        return proc.stdout

    def sbatch(self, *args: str, env: dict[str, str] | None = None) -> int:
        return int(self.run("sbatch", "--parsable", *args, env=env).strip().split(";")[0])

    def job(self, job_id: int) -> dict[str, str]:
        """`scontrol show job` as a dict (JobState, ExitCode, Restarts, NodeList, BatchHost, ...)."""
        return dict(re.findall(r"(\w+)=(\S*)", self.run("scontrol", "show", "job", "--oneliner", str(job_id))))

    def wait(self, job_id: int, timeout: float = 600) -> dict[str, str]:
        deadline = time.monotonic() + timeout
        while (job := self.job(job_id))["JobState"] not in DONE:
            if time.monotonic() > deadline:
                self.run("scancel", str(job_id))
                raise AssertionError(f"job {job_id} still {job['JobState']} after {timeout:.0f}s{self.logs()}")
            time.sleep(1)
        return job

    def logs(self, tail: int = 3000) -> str:
        """The daemons' logs, for failure messages."""
        return "".join(f"\n--- {path.name}\n{path.read_text(errors='replace')[-tail:]}"
                       for path in sorted([*self.root.glob("*.log"), *self.root.glob("*.out")]))

    # --- setup ---------------------------------------------------------------------------------------------------

    def _network(self) -> None:
        def ip(*args: str) -> None:
            proc = subprocess.run(["ip", *args], capture_output=True, text=True)
            if proc.returncode != 0:
                raise NetworkUnavailable(f"the Slurm nodes need network namespaces (root, CAP_NET_ADMIN, iproute2):"
                                         f" `ip {' '.join(args)}` failed: {proc.stderr.strip()}")

        ip("link", "add", self.bridge, "type", "bridge")
        ip("addr", "add", f"{self.controller_address}/24", "dev", self.bridge)
        ip("link", "set", self.bridge, "up")
        hosts = "127.0.0.1 localhost\n" + "".join(f"{node.address} {node.name}\n" for node in self.nodes)
        (self.root / "hosts").write_text(hosts)
        for node in self.nodes:
            ip("netns", "add", node.netns)
            ip("link", "add", node.veth, "type", "veth", "peer", "name", "eth0", "netns", node.netns)
            ip("link", "set", node.veth, "master", self.bridge, "up")
            ip("-n", node.netns, "addr", "add", f"{node.address}/24", "dev", "eth0")
            ip("-n", node.netns, "link", "set", "eth0", "up")
            ip("-n", node.netns, "link", "set", "lo", "up")

    def _write_config(self) -> None:
        r = self.root
        (r / "state").mkdir()
        for node in self.nodes:
            (r / "spool" / node.name).mkdir(parents=True)
        nodes = "".join(f"NodeName={node.name} NodeAddr={node.address} CPUs={self.cpus} Gres=gpu:{self.gpus}\n"
                        for node in self.nodes)
        self.conf.write_text(f"""\
ClusterName=moetest
SlurmctldHost={socket.gethostname()}({self.controller_address})
SlurmctldPort={free_port()}
SlurmdPort=6818
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
# A requeued job may start again cred_expire seconds after it stopped (default 120).
AuthInfo=socket={r / 'munge.socket'},cred_expire=10
StateSaveLocation={r / 'state'}
SlurmdSpoolDir={r / 'spool'}/%n
SlurmctldPidFile={r / 'slurmctld.pid'}
SlurmdPidFile={r / 'slurmd-%n.pid'}
SlurmctldLogFile={r / 'slurmctld.log'}
SlurmdLogFile={r / 'slurmd-%n.log'}
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
MpiDefault=none
GresTypes=gpu
ReturnToService=2
MinJobAge=3600
SchedulerParameters=sched_interval=1,bf_interval=1
KillWait=10
{nodes}PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
""")
        # Slurm counts GPUs by their device files; copies of /dev/null stand in for them.
        for i in range(self.gpus):
            os.mknod(r / f"gpu{i}", 0o666 | stat.S_IFCHR, os.makedev(1, 3))
        (r / "gres.conf").write_text(f"AutoDetect=off\nName=gpu File={r}/gpu[0-{self.gpus - 1}]\n")

    def _start_munge(self) -> None:
        key = self.root / "munge.key"
        subprocess.run(["mungekey", "--create", f"--keyfile={key}"], check=True, capture_output=True)
        self._spawn("munged", ["munged", "--foreground", "--force", f"--socket={self.root / 'munge.socket'}",
                               f"--key-file={key}", f"--pid-file={self.root / 'munged.pid'}",
                               f"--log-file={self.root / 'munged.log'}", f"--seed-file={self.root / 'munged.seed'}"])
        deadline = time.monotonic() + 30
        while not (self.root / "munge.socket").exists():
            if time.monotonic() > deadline:
                raise RuntimeError(f"munged did not start{self.logs()}")
            time.sleep(0.1)

    def _spawn(self, name: str, cmd: list[str]) -> None:
        with open(self.root / f"{name}.out", "w") as out:
            self.processes.append(subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=self.env()))

    def _wait_for_idle_nodes(self, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while True:
            proc = subprocess.run(["sinfo", "--noheader", "--Node", "--format=%N %t"], env=self.env(),
                                  capture_output=True, text=True)
            states = dict(line.split() for line in proc.stdout.splitlines())
            if proc.returncode == 0 and len(states) == len(self.nodes) and set(states.values()) == {"idle"}:
                return
            if time.monotonic() > deadline:
                raise RuntimeError(f"Slurm nodes not idle after {timeout}s: {proc.stdout}{proc.stderr}{self.logs()}")
            time.sleep(0.5)
