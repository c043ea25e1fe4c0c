"""The static performance model: occupancy, bytes in flight and issue rate -> predicted % of peak.

Inputs come from one compiled specialization (registers, shared memory, and from its SASS the
loads in flight per thread and the warp instructions of the innermost K/V loop) plus what the
kernel module states (threads per CTA, CTAs the plan launches, HBM bytes per CTA iteration).
docs/perf-model.md derives every formula; the constants below are fixed there, not fitted.
"""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass
from typing import Any


@dataclass(frozen=True)
class Gpu:
    name: str
    sms: int
    hbm_bytes_per_s: float  # datasheet peak
    clock_hz: float
    copy_bytes_per_s: float | None = None  # measured device-to-device copy (read + write), when known
    tensor_flop_per_clk_sm: int = 4096  # dense bf16/f16: 4 tensor cores x 1024 FLOP per clock
    fp32_flop_per_clk_sm: int = 256  # 128 FP32 lanes x 2 (FMA)


H100_SXM = Gpu("H100 SXM", sms=132, hbm_bytes_per_s=3.35e12, clock_hz=1.83e9)
H200 = Gpu("H200", sms=132, hbm_bytes_per_s=4.8e12, clock_hz=1.83e9, copy_bytes_per_s=4.3e12)
GPUS: tuple[Gpu, ...] = (H100_SXM, H200)

HBM_LATENCY_S = 700e-9  # under load
ISSUE_PER_CLK_SM = 4  # warp instructions per clock per SM (4 schedulers)
REGS_PER_SM = 64 * 1024
REG_ALLOC_UNIT = 256  # registers per warp are allocated in units of 256
SMEM_PER_SM = 228 * 1024
SMEM_RESERVED_PER_CTA = 1024  # the driver's per-CTA reservation (sm_80 and sm_90)
SMEM_ALLOC_UNIT = 128
MAX_CTAS_PER_SM = 32
MAX_THREADS_PER_SM = 2048
LOAD_BYTES = 16  # one 16-byte global load
FP32_FLOP = {"FFMA": 2, "FADD": 1, "FMUL": 1, "HFMA2": 4}  # FLOP per lane
LAUNCH_OVERHEAD_S = 2e-6  # per kernel launch inside a replayed graph (launch + grid ramp/drain)


@dataclass(frozen=True)
class Occupancy:
    by_registers: int
    by_shared: int
    by_threads: int
    by_launch: int  # CTAs the plan puts on one SM (MAX_CTAS_PER_SM when the grid fills every SM)
    resident: int  # the lowest of the four and MAX_CTAS_PER_SM

    @property
    def limiter(self) -> str:
        limits = {"registers": self.by_registers, "shared": self.by_shared, "threads": self.by_threads,
                  "launch": self.by_launch, "hardware": MAX_CTAS_PER_SM}  # fmt: skip
        return min(limits, key=lambda k: limits[k])


def occupancy(registers: int, smem_bytes: int, threads: int, launched_per_sm: int | None = None) -> Occupancy:
    """Resident CTAs per SM from the register file, shared memory, threads and the launch."""
    warps = -(-threads // 32)
    regs_per_warp = -(-max(registers, 1) * 32 // REG_ALLOC_UNIT) * REG_ALLOC_UNIT
    by_regs = REGS_PER_SM // (regs_per_warp * warps)
    smem = -(-(smem_bytes + SMEM_RESERVED_PER_CTA) // SMEM_ALLOC_UNIT) * SMEM_ALLOC_UNIT
    by_smem = SMEM_PER_SM // smem
    by_threads = MAX_THREADS_PER_SM // (warps * 32)
    by_launch = MAX_CTAS_PER_SM if launched_per_sm is None else launched_per_sm
    resident = min(by_regs, by_smem, by_threads, by_launch, MAX_CTAS_PER_SM)
    return Occupancy(by_regs, by_smem, by_threads, by_launch, resident)


def launched_per_sm(gpu: Gpu, ctas_per_sm: float | None, grid_ctas: int | None) -> tuple[int | None, int]:
    """(CTAs the launch puts on one SM or None for "as many as fit", SMs that get work)."""
    if grid_ctas is not None:
        return math.ceil(grid_ctas / gpu.sms), min(gpu.sms, grid_ctas)
    if ctas_per_sm is not None:
        return math.ceil(ctas_per_sm), gpu.sms
    return None, gpu.sms


@dataclass(frozen=True)
class MemoryPrediction:
    gpu: str
    bytes_in_flight_per_sm: float
    littles_bytes_per_s: float  # bytes in flight x active SMs / latency
    issue_bytes_per_s: float  # issue ceiling: 4 x clock x active SMs / (warp instructions per byte)
    predicted_bytes_per_s: float
    fraction_of_peak: float  # of the datasheet HBM peak
    fraction_of_copy: float | None  # of the measured copy bandwidth, when the GPU has one
    bound: str  # "latency (bytes in flight)" or "instruction issue"

    def as_json(self) -> dict[str, Any]:
        return asdict(self)


def predict_memory(gpu: Gpu, loads_in_flight: int, threads: int, resident_ctas: int,
                   instr_per_byte: float, active_sms: int | None = None) -> MemoryPrediction:  # fmt: skip
    """Little's law against the issue ceiling; the lower one over the peak."""
    sms = gpu.sms if active_sms is None else active_sms
    in_flight = loads_in_flight * LOAD_BYTES * threads * resident_ctas
    littles = in_flight * sms / HBM_LATENCY_S
    issue = ISSUE_PER_CLK_SM * gpu.clock_hz * sms / instr_per_byte if instr_per_byte > 0 else math.inf
    predicted = min(littles, issue, gpu.hbm_bytes_per_s)
    bound = "latency (bytes in flight)" if littles <= issue else "instruction issue"
    copy = predicted / gpu.copy_bytes_per_s if gpu.copy_bytes_per_s else None
    return MemoryPrediction(gpu.name, in_flight, littles, issue, predicted, predicted / gpu.hbm_bytes_per_s, copy, bound)


@dataclass(frozen=True)
class ComputePrediction:
    gpu: str
    flop_per_warp_instr: float
    issue_flop_per_s: float  # 4 x clock x SMs x FLOP per warp instruction
    peak_flop_per_s: float  # of the unit doing the math (tensor cores when the loop has MMA)
    predicted_flop_per_s: float
    fraction_of_peak: float  # of the dense tensor-core peak (the roofline a prefill kernel aims at)
    unit: str

    def as_json(self) -> dict[str, Any]:
        return asdict(self)


def predict_compute(gpu: Gpu, flop_per_warp_instr: float, tensor: bool, active_sms: int | None = None) -> ComputePrediction:
    sms = gpu.sms if active_sms is None else active_sms
    issue = ISSUE_PER_CLK_SM * gpu.clock_hz * sms * flop_per_warp_instr
    per_clk = gpu.tensor_flop_per_clk_sm if tensor else gpu.fp32_flop_per_clk_sm
    unit_peak = per_clk * gpu.clock_hz * gpu.sms
    tensor_peak = gpu.tensor_flop_per_clk_sm * gpu.clock_hz * gpu.sms
    predicted = min(issue, unit_peak)
    return ComputePrediction(gpu.name, flop_per_warp_instr, issue, unit_peak, predicted, predicted / tensor_peak,
                             "tensor cores" if tensor else "FP32 CUDA cores")  # fmt: skip


def flop_of(opcode: str) -> int:
    """FLOP one warp instruction performs: FFMA 2 x 32 lanes, FADD/FMUL 32, HFMA2 4 x 32; HMMA
    m16nNkK 2*16*N*K (m16n8k16: 4096); HGMMA 64xNxK (a warpgroup op, issued by each of its 4 warps)
    2*64*N*K / 4; 0 for everything else."""
    name = opcode.split(".")[0]
    if name in FP32_FLOP:
        return 32 * FP32_FLOP[name]
    m = re.match(r"^HMMA\.16(\d)(\d+)\b", opcode)
    if m:
        return 2 * 16 * int(m.group(1)) * int(m.group(2))
    m = re.match(r"^HGMMA\.64x(\d+)x(\d+)\b", opcode)
    if m:
        return 2 * 64 * int(m.group(1)) * int(m.group(2)) // 4
    return 0


def is_tensor(opcode: str) -> bool:
    return opcode.startswith(("HMMA", "HGMMA"))
