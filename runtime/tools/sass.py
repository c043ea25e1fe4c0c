"""SASS from a cubin (``nvdisasm`` from the pip wheel) and its structure: instructions, loops, counts.

``find_nvdisasm`` looks through ``cuda.pathfinder``, then the ``nvidia-cuda-nvdisasm`` wheel's own
bin folder, then PATH. ``parse`` turns ``nvdisasm -c`` text into functions of ``Instr``; ``loops``
finds the loops of a function from its backward branches; ``in_flight_loads`` walks a loop body
(three times, for loads that cross iterations) and reports the most 16-byte global loads
outstanding at once. Everything here reads text only: no GPU, no driver.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

#: opcode families counted per kernel and per loop: name -> test on the opcode (mnemonic + modifiers)
COUNTED: dict[str, re.Pattern[str]] = {
    "LDG.E.128": re.compile(r"^LDG\..*\b128\b"),
    "LDGSTS": re.compile(r"^LDGSTS\b"),
    "DEPBAR": re.compile(r"^(LDG)?DEPBAR\b"),
    "LDSM": re.compile(r"^LDSM\b"),
    "HMMA": re.compile(r"^HMMA\b"),
    "HGMMA": re.compile(r"^HGMMA\b"),
    "SHFL": re.compile(r"^SHFL\b"),
    "MUFU": re.compile(r"^MUFU\b"),
    "BAR": re.compile(r"^BAR\b"),
}
#: the compiler's 64-bit integer division/remainder helpers (CALLs to them are counted)
DIV64_HELPERS = re.compile(r"__cuda_sm\d+_(div|rem)_[su]64")
#: opcodes whose first operand is not a register they write
NO_DEST = re.compile(r"^(ST|STG|STS|STL|RED|BRA|BAR|EXIT|CALL|RET|BSSY|BSYNC|DEPBAR|LDGDEPBAR|LDGSTS|MEMBAR|WARPSYNC|NOP|YIELD|CCTL|ERRBAR|BPT|KILL|JMP|JMX|BRX)\b")
WIDE_LOAD = 16  # bytes per thread of the loads the model counts (LDG.E.128, LDGSTS.E.128)
_LINE = re.compile(r"^\s*/\*([0-9a-f]{4,})\*/\s+(.*?)\s*;")
_LABEL = re.compile(r"^(\.L_x_\d+|[A-Za-z_$][\w$.]*):\s*$")
_SECTION = re.compile(r"^\s*\.section\s+\.text\.([^,\s]+)")
_TARGET = re.compile(r"`\(([^)]+)\)")
_REG = re.compile(r"(?<![\w.])R(\d+)(\.64)?\b")


def find_nvdisasm() -> str | None:
    """Path of ``nvdisasm``: cuda.pathfinder, the pip wheel's bin folder, or PATH (None: none found)."""
    try:
        from cuda.pathfinder import find_nvidia_binary_utility

        found = find_nvidia_binary_utility("nvdisasm")
    except Exception:
        found = None
    return found or _wheel_nvdisasm() or shutil.which("nvdisasm")


def _wheel_nvdisasm() -> str | None:
    """``nvidia/cu13/bin/nvdisasm`` (or another CUDA line's folder) inside site-packages."""
    for base in map(Path, sys.path):
        for candidate in sorted((base / "nvidia").glob("cu*/bin/nvdisasm")) if (base / "nvidia").is_dir() else ():
            if candidate.is_file():
                return str(candidate)
    return None


def disassemble(nvdisasm: str, cubin: bytes) -> str:
    """``nvdisasm -c`` of a cubin (code sections only)."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        return subprocess.run([nvdisasm, "-c", f.name], capture_output=True, text=True, check=True).stdout


@dataclass(frozen=True)
class Instr:
    addr: int
    predicate: str  # "" or e.g. "@!P0"
    opcode: str  # mnemonic with modifiers, e.g. "LDG.E.128.CONSTANT"
    operands: tuple[str, ...]
    target: str = ""  # branch/call target label or function name

    @property
    def unconditional(self) -> bool:
        return self.predicate in ("", "@PT")

    def dest_regs(self) -> tuple[int, ...]:
        """Registers written (first operand, widened by the access size for loads)."""
        if NO_DEST.match(self.opcode) or not self.operands:
            return ()
        m = _REG.fullmatch(self.operands[0].split(".reuse")[0])
        if m is None:
            return ()
        base = int(m.group(1))
        return tuple(range(base, base + max(1, load_width(self.opcode) // 4)))

    def source_regs(self) -> set[int]:
        """Registers read (every operand but a written first one; ``R2.64`` reads R2 and R3)."""
        operands = self.operands if not self.dest_regs() else self.operands[1:]
        regs: set[int] = set()
        for text in operands:
            for m in _REG.finditer(text):
                base = int(m.group(1))
                regs.update((base, base + 1) if m.group(2) else (base,))
        return regs


@dataclass
class Function:
    name: str
    instrs: list[Instr] = field(default_factory=list)
    labels: dict[str, int] = field(default_factory=dict)  # label -> address of the next instruction


@dataclass(frozen=True)
class Loop:
    start: int  # address of the first instruction (the branch target)
    end: int  # address of the backward branch
    body: tuple[Instr, ...]

    def contains(self, other: Loop) -> bool:
        return self is not other and self.start <= other.start and other.end <= self.end


def parse(text: str) -> dict[str, Function]:
    """``nvdisasm -c`` text -> functions by name, instructions in address order."""
    functions: dict[str, Function] = {}
    current: Function | None = None
    pending: list[str] = []
    for line in text.splitlines():
        section = _SECTION.match(line)
        if section:
            current = functions.setdefault(section.group(1), Function(section.group(1)))
            pending = []
            continue
        if current is None:
            continue
        label = _LABEL.match(line)
        if label:
            pending.append(label.group(1))
            continue
        m = _LINE.match(line)
        if m is None:
            continue
        instr = _instr(int(m.group(1), 16), m.group(2))
        for name in pending:
            current.labels[name] = instr.addr
        pending = []
        current.instrs.append(instr)
    return functions


def _instr(addr: int, text: str) -> Instr:
    predicate = ""
    if text.startswith("@"):
        predicate, _, text = text.partition(" ")
    opcode, _, rest = text.strip().partition(" ")
    target = _TARGET.search(rest)
    operands = tuple(part.strip() for part in rest.split(",") if part.strip())
    return Instr(addr, predicate, opcode, operands, target.group(1) if target else "")


def kernel_function(functions: dict[str, Function]) -> Function:
    """The kernel: the largest function that is not a compiler helper (``__cuda_*``)."""
    candidates = [f for name, f in functions.items() if not name.startswith("__cuda")] or list(functions.values())
    if not candidates:
        raise ValueError("no code section in the SASS")
    return max(candidates, key=lambda f: len(f.instrs))


def loops(fn: Function) -> list[Loop]:
    """Loops from backward branches: a branch to a label at or before it, with no unconditional EXIT
    or RET in between (that excludes the out-of-line blocks the compiler places after the exit, which
    jump back into a loop) and not a one-instruction self-branch (the trailing trap)."""
    loops_found = []
    index = {instr.addr: k for k, instr in enumerate(fn.instrs)}
    for k, instr in enumerate(fn.instrs):
        if not instr.opcode.startswith("BRA") or instr.target not in fn.labels:
            continue
        start = fn.labels[instr.target]
        if start >= instr.addr or start not in index:
            continue
        body = fn.instrs[index[start] : k + 1]
        if any(i.unconditional and i.opcode.split(".")[0] in ("EXIT", "RET") for i in body):
            continue
        loops_found.append(Loop(start, instr.addr, tuple(body)))
    return loops_found


def innermost(found: list[Loop]) -> list[Loop]:
    return [loop for loop in found if not any(loop.contains(other) for other in found)]


def count(instrs: tuple[Instr, ...] | list[Instr]) -> dict[str, int]:
    """Counts of the COUNTED families and of CALLs to 64-bit division helpers."""
    out = {name: sum(1 for i in instrs if pattern.match(i.opcode)) for name, pattern in COUNTED.items()}
    out["div64_calls"] = sum(1 for i in instrs if i.opcode.startswith("CALL") and DIV64_HELPERS.search(i.target))
    return out


def load_width(opcode: str) -> int:
    """Bytes per thread of a global/shared load opcode (LDG.E.128 -> 16; LDG.E -> 4); 0 for others."""
    if not re.match(r"^(LDG|LDGSTS|LDS|LD)\b", opcode):
        return 0
    for bits, width in (("128", 16), ("64", 8), ("U16", 2), ("S16", 2), ("U8", 1), ("S8", 1)):
        if re.search(rf"\.{bits}\b", opcode):
            return width
    return 4


def is_global_load(opcode: str) -> bool:
    return bool(re.match(r"^(LDG|LDGSTS)\b", opcode))


def global_load_bytes(instrs: tuple[Instr, ...], width: int = 0) -> int:
    """Bytes a full warp's global loads move in one pass over ``instrs`` (32 lanes x width); only
    loads of ``width`` bytes per thread when given."""
    return sum(32 * load_width(i.opcode) for i in instrs
               if is_global_load(i.opcode) and (not width or load_width(i.opcode) == width))  # fmt: skip


def in_flight_loads(body: tuple[Instr, ...], passes: int = 3) -> int:
    """Most 16-byte global loads one thread has outstanding at once in a loop.

    A plain ``LDG ... 128`` is outstanding until an instruction reads one of the registers it
    writes; an ``LDGSTS ... 128`` until the ``DEPBAR.LE SB0, N`` that leaves at most N commit groups
    (``LDGDEPBAR``) pending. The body is walked ``passes`` times so loads issued for a later
    iteration count too."""
    outstanding: list[set[int]] = []  # register sets of plain loads not yet used
    groups: list[int] = []  # LDGSTS per committed group, oldest first
    open_group = 0
    most = 0
    for _ in range(passes):
        for instr in body:
            reads = instr.source_regs()
            outstanding = [regs for regs in outstanding if not regs & reads]
            written = set(instr.dest_regs())
            if written:
                outstanding = [regs for regs in outstanding if not regs & written]
            if instr.opcode.startswith("LDGSTS") and load_width(instr.opcode) == 16:
                open_group += 1
            elif instr.opcode.startswith("LDGDEPBAR"):
                groups.append(open_group)
                open_group = 0
            elif instr.opcode.startswith("DEPBAR"):
                keep = _depbar_keep(instr)
                groups = groups[len(groups) - keep :] if keep < len(groups) else groups
                if keep == 0:
                    groups = []
            elif instr.opcode.startswith("LDG.") and load_width(instr.opcode) == 16 and written:
                outstanding.append(written)
            most = max(most, len(outstanding) + sum(groups) + open_group)
    return most


def _depbar_keep(instr: Instr) -> int:
    """N of ``DEPBAR.LE SB0, N`` (commit groups allowed to stay pending); 0 when it waits for all."""
    for operand in instr.operands[1:]:
        if re.fullmatch(r"0x[0-9a-f]+|\d+", operand):
            return int(operand, 0)
    return 0
