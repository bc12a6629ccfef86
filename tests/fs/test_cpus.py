"""The CPUs a process may use: affinity, capped by a cgroup quota (cpu.max)."""
import os

import pytest

from streamconv.fs import cpus


@pytest.mark.parametrize("text,expected", [
    ("max 100000\n", None), ("150000 100000\n", 1.5), ("200000 100000", 2.0), ("50000 100000", 0.5),
    ("", None), ("garbage", None), ("-1 100000", None), ("100000 0", None), ("1 2 3", None),
])
def test_parse_cpu_max(text, expected):
    assert cpus.parse_cpu_max(text) == expected


def test_a_quota_caps_the_affinity_mask(tmp_path, monkeypatch):
    cpu_max = tmp_path / "cpu.max"
    cpu_max.write_text("150000 100000\n")
    monkeypatch.setattr(cpus, "CGROUP_V2_CPU_MAX", str(cpu_max))
    monkeypatch.setattr(cpus, "affinity_cpus", lambda: 16)
    assert cpus.available_cpus() == 1.5
    cpu_max.write_text("max 100000\n")
    assert cpus.available_cpus() == 16


def test_cgroup_v1_quota(tmp_path, monkeypatch):
    quota, period = tmp_path / "quota", tmp_path / "period"
    quota.write_text("250000\n")
    period.write_text("100000\n")
    monkeypatch.setattr(cpus, "CGROUP_V2_CPU_MAX", str(tmp_path / "absent"))
    monkeypatch.setattr(cpus, "CGROUP_V1_QUOTA", str(quota))
    monkeypatch.setattr(cpus, "CGROUP_V1_PERIOD", str(period))
    assert cpus.cgroup_cpu_quota() == 2.5
    quota.write_text("-1\n")
    assert cpus.cgroup_cpu_quota() is None


def test_this_machine():
    assert cpus.affinity_cpus() == len(os.sched_getaffinity(0))
    assert 0 < cpus.available_cpus() <= cpus.affinity_cpus()
