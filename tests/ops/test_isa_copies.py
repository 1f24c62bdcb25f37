"""The CPU kernels' instruction-set copies: no wider instruction is reachable from a narrower copy.

csrc/cpu builds each op's kernels three times (DEFAULT, AVX2, AVX512 namespaces) and dispatches
on ATen's CPU capability. A copy compiled for a narrow instruction set must never end up running
code compiled for a wider one, e.g. an inline helper whose AVX-512 instance the linker kept for
every caller, which is an illegal instruction on an AVX2 machine. The host here has AVX-512, so
running the narrow copies cannot show that; the disassembly of the built extension can. From the
functions of one copy, this walks every call, jump and address taken (PLT and GOT entries
resolved to the extension's own definitions) and decodes each reached instruction's prefix:
VEX (c4/c5) or EVEX (62) in the DEFAULT copy, or EVEX in the AVX2 copy, fails the test.
"""

from __future__ import annotations

import platform
import re
import shutil
import subprocess
from collections import deque
from functools import cache
from pathlib import Path

import pytest

import mtlfast
from mtlfast._extension import has_extension

OBJDUMP = shutil.which("objdump")
CXXFILT = shutil.which("c++filt")
OPS = {  # each op's per-ISA entry point, demangled with {isa} for the copy
    "attention_distill": "mtlfast::cpu::{isa}::attention_distill_kernels()",
    "batch_norm": "mtlfast::cpu::batch_norm::{isa}::kernels()",
    "max_pool": "mtlfast::cpu::max_pool::{isa}::kernels()",
    "skip_fusion": "mtlfast::cpu::skip_fusion::{isa}::kernels()",
    "task_se": "mtlfast::cpu::task_se::{isa}::kernels()",
    "winograd_conv": "mtlfast::cpu::winograd_conv::{isa}::kernels()",
}
# Instruction prefixes that may precede a VEX/EVEX prefix or a legacy opcode (x86-64).
_LEGACY = {0xF0, 0xF2, 0xF3, 0x2E, 0x36, 0x3E, 0x26, 0x64, 0x65, 0x66, 0x67}
_HEADER = re.compile(r"^([0-9a-f]+) <(.+)>:$")
_INSN = re.compile(r"^\s*([0-9a-f]+):\t([0-9a-f ]+)\t(.*)$")
_REF = re.compile(r"\b([0-9a-f]+) <([^>]+)>")

pytestmark = [
    pytest.mark.skipif(platform.machine() != "x86_64", reason="the ISA copies are x86-64 only"),
    pytest.mark.skipif(not has_extension(), reason="mtlfast._C is not built"),
    pytest.mark.skipif(OBJDUMP is None or CXXFILT is None, reason="needs binutils (objdump)"),
]


def _library() -> Path:
    (path,) = Path(mtlfast.__file__).parent.glob("_C*.so")
    return path


def _encoding(hex_bytes: str) -> str:
    """'evex', 'vex' or 'legacy': the encoding of one instruction from its bytes."""
    for b in (int(h, 16) for h in hex_bytes.split()):
        if b in _LEGACY or 0x40 <= b <= 0x4F:  # prefixes, REX
            continue
        return {0x62: "evex", 0xC4: "vex", 0xC5: "vex"}.get(b, "legacy")
    return "legacy"


class Disassembly:
    """The extension's functions: their instructions, what they reference, their names."""

    def __init__(self, library: Path):
        text = subprocess.run(
            [OBJDUMP, "-d", "-w", str(library)], capture_output=True, text=True, check=True
        ).stdout
        self.functions: dict[int, list[tuple[str, str]]] = {}  # start -> [(bytes, asm)]
        self.names: dict[int, str] = {}
        plt: dict[int, str] = {}
        body = None
        for line in text.splitlines():
            if m := _HEADER.match(line):
                addr, name = int(m[1], 16), m[2]
                if name.endswith("@plt"):
                    plt[addr], body = name[:-4], None
                else:
                    self.names[addr], body = name, self.functions.setdefault(addr, [])
            elif body is not None and (m := _INSN.match(line)):
                body.append((m[2], m[3]))
        # A PLT stub or GOT slot runs the extension's own definition of its symbol when it has
        # one (the extension is searched before the libraries it needs).
        defined = self._dynamic_definitions(library)
        self.indirect = {a: defined[n] for a, n in plt.items() if n in defined}
        relocs = subprocess.run(
            [OBJDUMP, "-R", str(library)], capture_output=True, text=True, check=True
        ).stdout
        for line in relocs.splitlines():
            parts = line.split()
            if len(parts) == 3 and parts[2].split("+")[0] in defined:
                self.indirect[int(parts[0], 16)] = defined[parts[2].split("+")[0]]
        mangled = list(self.names.values())
        demangled = subprocess.run(
            [CXXFILT], input="\n".join(mangled), capture_output=True, text=True, check=True
        ).stdout.splitlines()
        self.demangled = dict(zip(self.names, demangled))

    @staticmethod
    def _dynamic_definitions(library: Path) -> dict[str, int]:
        out = subprocess.run(
            [OBJDUMP, "-T", str(library)], capture_output=True, text=True, check=True
        ).stdout
        defined = {}
        for line in out.splitlines():
            parts = line.split()
            if len(parts) >= 6 and parts[0] != "0000000000000000" and ".text" in parts:
                defined[parts[-1]] = int(parts[0], 16)
        return defined

    def references(self, start: int) -> set[int]:
        """Starts of the functions that the function at start calls, jumps to or takes."""
        found = set()
        for _, asm in self.functions[start]:
            for m in _REF.finditer(asm):
                addr = int(m[1], 16)
                addr = self.indirect.get(addr, addr)
                if addr in self.functions and addr != start:
                    found.add(addr)
        return found

    def reachable(self, roots: set[int]) -> set[int]:
        seen, todo = set(roots), deque(roots)
        while todo:
            for ref in self.references(todo.popleft()) - seen:
                seen.add(ref)
                todo.append(ref)
        return seen

    def copy_roots(self, isa: str) -> set[int]:
        """The functions of one ISA copy: everything in its mtlfast::cpu[::op]::<isa> namespace."""
        pattern = re.compile(rf"\bmtlfast::cpu::(\w+::)?{isa}::")
        return {a for a, name in self.demangled.items() if pattern.search(name)}

    def wide(self, functions: set[int], banned: set[str]) -> list[str]:
        """'function: instruction' for each instruction of a banned encoding in functions."""
        return [
            f"{self.demangled[a]}: {asm}"
            for a in sorted(functions)
            for raw, asm in self.functions[a]
            if _encoding(raw) in banned
        ]


@cache
def _disassembly() -> Disassembly:
    return Disassembly(_library())


@pytest.mark.parametrize(
    "raw, encoding",
    [
        ("c5 fc 28 c1", "vex"),
        ("c4 e2 7d 18 c0", "vex"),
        ("62 f1 7c 48 28 c1", "evex"),
        ("67 62 f1 7c 48 28 00", "evex"),
        ("48 8d 05 2f 58 0e 00", "legacy"),
        ("66 0f ef c0", "legacy"),
        ("66 2e 0f 1f 84 00 00 00 00 00", "legacy"),
        ("c3", "legacy"),
    ],
)
def test_encoding_of_instruction_bytes(raw, encoding):
    assert _encoding(raw) == encoding


def test_every_copy_is_built():
    names = set(_disassembly().demangled.values())
    for op, entry in OPS.items():
        for isa in ("DEFAULT", "AVX2", "AVX512"):
            assert entry.format(isa=isa) in names, f"{op}: no {isa} copy in {_library().name}"


@pytest.mark.parametrize(
    "isa, banned, foreign",
    [
        ("DEFAULT", {"vex", "evex"}, ("AVX2", "AVX512")),
        ("AVX2", {"evex"}, ("AVX512",)),
    ],
)
def test_no_wider_instruction_reachable_from_copy(isa, banned, foreign):
    dis = _disassembly()
    roots = dis.copy_roots(isa)
    reached = dis.reachable(roots)
    # The walk does reach past the copy's own namespace (inline helpers from c10, at::vec, std).
    assert len(reached) > len(roots) > 10
    other = re.compile(rf"\b({'|'.join(foreign)})::")
    strays = sorted(dis.demangled[a] for a in reached if other.search(dis.demangled[a]))
    assert not strays, f"the {isa} copy reaches another copy's code:\n" + "\n".join(strays[:20])
    wide = dis.wide(reached, banned)
    assert not wide, f"{len(wide)} {'/'.join(sorted(banned))} instructions reachable from the " + (
        f"{isa} copy:\n" + "\n".join(wide[:20])
    )


def test_the_check_sees_the_wide_copies():
    # Guards the test above against passing vacuously: the AVX512 copy does use EVEX, AVX2 VEX.
    dis = _disassembly()
    assert dis.wide(dis.reachable(dis.copy_roots("AVX512")), {"evex"})
    assert dis.wide(dis.reachable(dis.copy_roots("AVX2")), {"vex"})
