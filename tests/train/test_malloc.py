"""keep_freed_memory: after it, a large tensor freed and allocated again faults no page in; the
trainer applies it on the CPU unless told not to; elsewhere than glibc it changes nothing."""

import json
import subprocess
import sys

import pytest

from mtlfast.train import Trainer, keep_freed_memory
from mtlfast.train import malloc as malloc_module

from .helpers import tiny_config

# In a fresh process: the minor page faults of filling a new 64 MiB tensor, eight times over,
# with or without keep_freed_memory() first. glibc maps such a block afresh every time (it is above
# its largest mmap threshold) unless told to keep its memory.
_FAULTS = """
import json, resource, sys, torch
from mtlfast.train import keep_freed_memory
kept = keep_freed_memory() if sys.argv[1] == "keep" else None
faults = []
for _ in range(8):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    x = torch.empty(16 << 20).fill_(1.0)  # 64 MiB
    del x
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(json.dumps({"kept": kept, "faults": faults}))
"""


def _faults(mode: str) -> dict:
    out = subprocess.run(
        [sys.executable, "-c", _FAULTS, mode], capture_output=True, text=True, check=True
    ).stdout
    return json.loads(out.strip().splitlines()[-1])


@pytest.mark.skipif(malloc_module._glibc() is None, reason="the C library is not glibc")
def test_freed_memory_is_reused_without_page_faults():
    pages = (64 << 20) // 4096
    plain = _faults("plain")
    assert all(f >= pages // 2 for f in plain["faults"]), plain  # mapped and faulted every time
    kept = _faults("keep")
    assert kept["kept"] is True
    # the first fills grow the heap (small objects may take the start of a freed block, so that
    # the next big one does not fit there yet); then it is reused
    assert kept["faults"][0] >= pages // 2 and max(kept["faults"][4:]) < pages // 20, kept


def test_not_glibc_changes_nothing(monkeypatch):
    monkeypatch.setattr(malloc_module.sys, "platform", "darwin")
    assert malloc_module._glibc() is None
    assert keep_freed_memory() is False


def test_trainer_applies_it_on_the_cpu_unless_told_not_to(monkeypatch):
    calls = []
    monkeypatch.setattr("mtlfast.train.trainer.keep_freed_memory", lambda: calls.append(1) or True)
    assert Trainer(tiny_config("train.device=cpu")).kept_freed_memory is True and calls == [1]
    off = tiny_config("train.device=cpu", "train.keep_freed_memory=false")
    assert Trainer(off).kept_freed_memory is False and calls == [1]
