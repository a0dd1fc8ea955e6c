"""The training process's host allocator setting (backbones/engine/hostmem.py), checked in fresh processes so
that the test process's own allocator is left as it was."""
import json
import os
import subprocess
import sys

import pytest

from backbones.engine.errors import ConfigError
from backbones.engine.hostmem import ENV, is_glibc_linux, keep_freed_host_memory
from conftest import ROOT

# Minor page faults of each of 20 allocate-fill-free cycles of a 48 MB tensor (above the 32 MB that glibc's
# dynamic mmap threshold can reach, so under its defaults every cycle maps and faults in fresh pages), before
# and after. The first cycles after the setting grow the heap (one or two in most runs, now and then more), so
# the test reads the median: the steady state a training run lives in.
# Transparent huge pages are turned off for the probe (prctl PR_SET_THP_DISABLE): with THP "always" a
# machine would fault 2 MB at a time and the counts would depend on its setting.
PROBE = """
import ctypes, json, resource, statistics, torch
from backbones.engine.hostmem import keep_freed_host_memory
ctypes.CDLL(None).prctl(41, 1, 0, 0, 0)

def median_faults_per_cycle(cycles=20):
    faults = []
    for _ in range(cycles):
        start = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        torch.ones(12 * 2**20)
        faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - start)
    return statistics.median(faults)

before = median_faults_per_cycle()
changed = keep_freed_host_memory()
print(json.dumps({"changed": changed, "before": before, "after": median_faults_per_cycle()}))
"""


def probe(setting: str | None) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env.pop(ENV, None)
    if setting is not None:
        env[ENV] = setting
    out = subprocess.run([sys.executable, "-c", PROBE], cwd=ROOT, env=env, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not is_glibc_linux(), reason="the setting is glibc's; elsewhere it is a no-op")
def test_freed_blocks_are_reused_instead_of_faulted_in_again():
    kept = probe(None)
    assert kept["changed"]
    # 48 MB is about 12,000 pages of 4 KB; reused memory faults in none
    assert kept["before"] >= 5000, kept
    assert kept["after"] * 10 < kept["before"], kept
    system = probe("system")
    assert not system["changed"]
    assert system["after"] * 2 > system["before"], system  # glibc's defaults: still faulting every cycle


def test_an_unknown_setting_names_the_variable_and_the_choices(monkeypatch):
    monkeypatch.setenv(ENV, "jemalloc")
    with pytest.raises(ConfigError, match=f"{ENV}='jemalloc'.*'keep'.*'system'"):
        keep_freed_host_memory()
