"""In CI (CI=true) a Slurm that cannot be set up fails the run; elsewhere the Slurm tests skip. No Slurm is started."""

import shutil

import pytest

from . import cluster


def no_apt() -> str:
    return "Slurm is not installed and there is no apt-get (as root) to install it"


@pytest.mark.parametrize("ci, outcome", [("true", pytest.fail.Exception), ("", pytest.skip.Exception),
                                         (None, pytest.skip.Exception)])
def test_failed_install(monkeypatch, ci, outcome):
    monkeypatch.setattr(cluster, "install_slurm", no_apt)
    if ci is None:
        monkeypatch.delenv("CI", raising=False)
    else:
        monkeypatch.setenv("CI", ci)
    with pytest.raises(outcome, match="no apt-get"):
        cluster.start_cluster()


@pytest.mark.parametrize("ci, outcome", [("true", pytest.fail.Exception), ("false", pytest.skip.Exception)])
def test_failed_network_setup_stops_what_started(monkeypatch, ci, outcome):
    stopped = []

    def start(self):
        raise cluster.NetworkUnavailable("the Slurm nodes need network namespaces")

    monkeypatch.setattr(cluster, "install_slurm", lambda: None)
    monkeypatch.setattr(cluster.SlurmCluster, "start", start)
    monkeypatch.setattr(cluster.SlurmCluster, "stop", lambda self: (stopped.append(self), shutil.rmtree(self.root)))
    monkeypatch.setenv("CI", ci)
    with pytest.raises(outcome, match="network namespaces"):
        cluster.start_cluster()
    assert len(stopped) == 1
