"""SASS parsing: functions, loops from backward branches, counts, loads in flight (hand-written SASS)."""

from __future__ import annotations

import importlib.metadata
import os

import pytest

from tilegraph.tools import sass

# a kernel with: a token loop (two 16-byte loads, the second issued before the first is used; a call
# to the 64-bit division helper), a shared-memory loop, an out-of-line block after EXIT that jumps
# back into the loop (not a loop) and the trailing self-branch (not a loop)
KERNEL = """
	.section	.text.__cuda_sm20_div_s64,"ax",@progbits
__cuda_sm20_div_s64:
        /*0000*/                   IADD3 R3, P1, RZ, -R6, RZ ;
        /*0010*/                   RET.REL.NODEC R20 `(kernel) ;
	.section	.text.kernel,"ax",@progbits
kernel:
        /*0000*/                   S2R R0, SR_TID.X ;
.L_x_1:
        /*0010*/                   LDG.E R9, desc[UR4][R2.64] ;
        /*0020*/                   CALL.ABS.NOINC `(__cuda_sm20_div_s64) ;
        /*0030*/                   LDG.E.128.CONSTANT R4, desc[UR4][R10.64] ;
        /*0040*/              @!P1 LDG.E.128.CONSTANT R12, desc[UR4][R10.64+0x10] ;
        /*0050*/                   FFMA R20, R4, R5, R20 ;
        /*0060*/                   BRA.DIV UR4, `(.L_x_9) ;
.L_x_8:
        /*0070*/                   SHFL.BFLY PT, R21, R20, 0x1, 0x1f ;
        /*0080*/                   FFMA R22, R13, R14, R22 ;
        /*0090*/                   MUFU.EX2 R23, R22 ;
        /*00a0*/               @P0 BRA `(.L_x_1) ;
.L_x_2:
        /*00b0*/                   LDS R24, [R0] ;
        /*00c0*/                   FFMA R25, R24, R24, R25 ;
        /*00d0*/                   BAR.SYNC.DEFER_BLOCKING 0x0 ;
        /*00e0*/               @P2 BRA `(.L_x_2) ;
        /*00f0*/                   STG.E desc[UR4][R2.64], R25 ;
        /*0100*/                   EXIT ;
.L_x_9:
        /*0110*/                   WARPSYNC 0xffffffff ;
        /*0120*/                   BRA `(.L_x_8) ;
.L_x_3:
        /*0130*/                   BRA `(.L_x_3) ;
"""

# a two-stage cp.async pipeline: two 16-byte copies per commit group, wait until one group is pending
PIPELINE = """
	.section	.text.pipe,"ax",@progbits
pipe:
.L_x_0:
        /*0000*/                   LDGSTS.E.BYPASS.LTC128B.128 [R3], desc[UR4][R4.64] ;
        /*0010*/                   LDGSTS.E.BYPASS.LTC128B.128 [R3+0x800], desc[UR4][R4.64+0x800] ;
        /*0020*/                   LDGDEPBAR ;
        /*0030*/                   DEPBAR.LE SB0, 0x1 ;
        /*0040*/                   LDSM.16.M88.4 R8, [R6] ;
        /*0050*/                   HMMA.16816.F32.BF16 R12, R8, R10, R12 ;
        /*0060*/               @P0 BRA `(.L_x_0) ;
        /*0070*/                   EXIT ;
"""


def test_parse_functions_and_labels() -> None:
    fns = sass.parse(KERNEL)
    assert set(fns) == {"__cuda_sm20_div_s64", "kernel"}
    kernel = sass.kernel_function(fns)
    assert kernel.name == "kernel" and len(kernel.instrs) == 20
    assert kernel.labels[".L_x_1"] == 0x10 and kernel.labels[".L_x_9"] == 0x110
    load = kernel.instrs[4]
    assert (load.predicate, load.opcode, load.dest_regs()) == ("@!P1", "LDG.E.128.CONSTANT", (12, 13, 14, 15))
    assert load.source_regs() == {10, 11}
    store = kernel.instrs[15]
    assert store.dest_regs() == () and store.source_regs() == {2, 3, 25}


def test_loops_skip_out_of_line_blocks_and_the_trap() -> None:
    kernel = sass.kernel_function(sass.parse(KERNEL))
    found = sass.loops(kernel)
    assert [(loop.start, loop.end) for loop in found] == [(0x10, 0xA0), (0xB0, 0xE0)]
    assert len(found[0].body) == 10
    assert sass.innermost(found) == found  # neither contains the other


def test_counts_and_loop_bytes() -> None:
    kernel = sass.kernel_function(sass.parse(KERNEL))
    token_loop = sass.loops(kernel)[0]
    got = sass.count(token_loop.body)
    assert got["LDG.E.128"] == 2 and got["SHFL"] == 1 and got["MUFU"] == 1 and got["div64_calls"] == 1
    assert got["BAR"] == 0 and sass.count(kernel.instrs)["BAR"] == 1
    assert sass.global_load_bytes(token_loop.body) == 32 * (4 + 16 + 16)
    assert sass.global_load_bytes(token_loop.body, width=16) == 32 * 32


def test_loads_in_flight_plain_and_async() -> None:
    kernel = sass.kernel_function(sass.parse(KERNEL))
    # R4 and R12 loads are both issued before the FFMA reads R4: two in flight
    assert sass.in_flight_loads(sass.loops(kernel)[0].body) == 2
    pipe = sass.kernel_function(sass.parse(PIPELINE))
    body = sass.loops(pipe)[0].body
    # steady state: the group of this iteration and the one left pending by the previous wait
    assert sass.in_flight_loads(body) == 4
    assert sass.in_flight_loads(body, passes=1) == 2
    counts = sass.count(body)
    assert (counts["LDGSTS"], counts["DEPBAR"], counts["LDSM"], counts["HMMA"]) == (2, 2, 1, 1)


def test_a_dependent_load_is_not_in_flight_with_its_producer() -> None:
    text = PIPELINE.replace(
        "        /*0000*/                   LDGSTS.E.BYPASS.LTC128B.128 [R3], desc[UR4][R4.64] ;\n"
        "        /*0010*/                   LDGSTS.E.BYPASS.LTC128B.128 [R3+0x800], desc[UR4][R4.64+0x800] ;\n"
        "        /*0020*/                   LDGDEPBAR ;\n"
        "        /*0030*/                   DEPBAR.LE SB0, 0x1 ;\n",
        "        /*0000*/                   LDG.E.128 R20, desc[UR4][R4.64] ;\n"
        "        /*0010*/                   LDG.E.128 R24, desc[UR4][R20.64] ;\n"
        "        /*0020*/                   FADD R30, R24, R25 ;\n"
        "        /*0030*/                   NOP ;\n",
    )
    body = sass.loops(sass.kernel_function(sass.parse(text)))[0].body
    assert sass.in_flight_loads(body) == 1


def _nvdisasm_installed() -> bool:
    try:
        importlib.metadata.version("nvidia-cuda-nvdisasm")
    except importlib.metadata.PackageNotFoundError:
        return False
    return True


@pytest.mark.skipif(not _nvdisasm_installed(), reason="nvidia-cuda-nvdisasm (the test extra) is not installed")
def test_nvdisasm_is_found_from_the_wheel(monkeypatch: pytest.MonkeyPatch) -> None:
    found = sass.find_nvdisasm()
    assert found is not None and os.access(found, os.X_OK)
    monkeypatch.setenv("PATH", "")
    wheel = sass._wheel_nvdisasm()
    assert wheel is not None and os.access(wheel, os.X_OK)
