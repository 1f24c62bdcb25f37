"""The op tests on every instruction-set copy of the CPU kernels, not only the host's widest.

csrc/cpu dispatches to the copy of ATen's CPU capability, which ATEN_CPU_CAPABILITY lowers. The
test session runs on the host's own (AVX512 on the CI machine); here the cpu-backend cases of the
op tests run again in a subprocess for each narrower capability. Left out, to keep this within
about a minute: opcheck (it checks the dispatcher's registrations, the same for every copy), the
streaming-store cases in the DEFAULT copy (whose streaming store is a plain store) and their
bfloat16 case in the AVX2 copy (the float32 one runs the same AVX2 stores).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mtlfast._extension import cpu_isa, has_extension

ROOT = Path(__file__).resolve().parents[2]
OP_TESTS = (
    "test_attention_distill.py",
    "test_batch_norm.py",
    "test_max_pool.py",
    "test_softmax_xent.py",
    "test_skip_fusion.py",
    "test_task_se.py",
    "test_winograd_conv.py",
)
# The narrower capabilities: the host capabilities that can run each, and its test selection.
NARROWER = {
    "default": (("DEFAULT", "AVX2", "AVX512"), "cpu and not opcheck and not stream"),
    "avx2": (("AVX2", "AVX512"), "cpu and not opcheck and not (stream and bfloat16)"),
}

pytestmark = pytest.mark.skipif(not has_extension(), reason="mtlfast._C is not built")


def test_kernels_follow_aten_cpu_capability():
    assert cpu_isa() == torch.backends.cpu.get_cpu_capability().lower()


@pytest.mark.parametrize("capability", NARROWER)
def test_op_tests_pass_on_narrower_copy(capability):
    host = torch.backends.cpu.get_cpu_capability()
    if host.lower() == capability:
        pytest.skip(f"the session itself runs the {capability} copy")
    hosts, selection = NARROWER[capability]
    if host not in hosts:
        pytest.skip(f"a {host} host cannot run the {capability} copy")
    here = Path(__file__).resolve().parent
    cmd = [
        sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider",
        "-k", selection,
        *(str(here / name) for name in OP_TESTS),
        f"{here / Path(__file__).name}::test_kernels_follow_aten_cpu_capability",
    ]  # fmt: skip
    env = {**os.environ, "ATEN_CPU_CAPABILITY": capability, "MTLFAST_REQUIRE_BACKENDS": "cpu"}
    result = subprocess.run(
        cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600, check=False
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, f"ATEN_CPU_CAPABILITY={capability}:\n{output[-6000:]}"
    assert " passed" in output, output[-2000:]
