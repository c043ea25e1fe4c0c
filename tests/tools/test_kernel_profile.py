"""The tensor-core loop's fast path (kernel_profile.fast_path) on hand-written SASS."""

from __future__ import annotations

from tilegraph.tools import kernel_profile, sass

FALLBACK = 80  # instructions of a scalar fallback block (>= SKIP_MIN_INSTRUCTIONS)


def _kv_block_loop() -> str:
    """A KV-block loop: the next block's copies behind a branch over the last block's wait; Q K^T; a
    NaN check left as a short branch; a fallback block branched around; P V; the back edge."""
    lines = ["\t.section\t.text.kernel,\"ax\",@progbits", "kernel:"]
    addr = 0

    def emit(text: str) -> None:
        nonlocal addr
        lines.append(f"        /*{addr:04x}*/                   {text} ;")
        addr += 0x10

    emit("S2R R0, SR_TID.X")
    lines.append(".L_x_1:")
    emit("@P3 BRA `(.L_x_4)")  # not the last block: issue the next one
    emit("DEPBAR.LE SB0, 0x0")
    emit("BRA `(.L_x_5)")
    lines.append(".L_x_4:")
    emit("LDGSTS.E.BYPASS.128 [R1], desc[UR4][R2.64]")
    emit("LDGDEPBAR")
    emit("DEPBAR.LE SB0, 0x1")
    lines.append(".L_x_5:")
    emit("HMMA.16816.F32.BF16 R4, R8, R12, R4")
    emit("FSETP.NAN.FTZ.AND P0, PT, R7, R7, PT")
    emit("@P0 BRA `(.L_x_6)")  # the running max is NaN: skip the compare (rare)
    emit("FSETP.GT.FTZ.AND P1, PT, R5, R6, PT")
    emit("FSEL R7, R5, R6, P1")
    lines.append(".L_x_6:")
    emit("@!P4 BRA `(.L_x_7)")  # no masked entry next to a non-finite V: skip the fallback
    for _ in range(FALLBACK):
        emit("FFMA R20, R21, R22, R20")
    lines.append(".L_x_7:")
    emit("HMMA.16816.F32.BF16 R16, R8, R12, R16")
    emit("@P5 BRA `(.L_x_1)")
    emit("EXIT")
    return "\n".join(lines) + "\n"


def test_fast_path_takes_the_copies_charges_short_skips_and_skips_the_fallback() -> None:
    fn = sass.kernel_function(sass.parse(_kv_block_loop()))
    loop, instructions = kernel_profile.tensor_loop(fn, sass.loops(fn))
    assert len(loop.body) == 14 + FALLBACK
    # branch (1) + the skipped wait charged (2) + the copies (3) + HMMA, NaN test, branch (3) + the
    # compare, run or charged (2) + branch over the fallback (1) + HMMA, back edge (2)
    assert kernel_profile.fast_path(fn, loop) == (2, 14)
    assert instructions == 14


def test_a_fallback_with_the_only_mma_is_on_the_path() -> None:
    """Most HMMA first: a branch around the only tensor-core code is never the fast path."""
    text = _kv_block_loop().replace("FFMA R20, R21, R22, R20", "HMMA.16816.F32.BF16 R20, R8, R12, R20", 1)
    fn = sass.kernel_function(sass.parse(text))
    loop, instructions = kernel_profile.tensor_loop(fn, sass.loops(fn))
    assert kernel_profile.fast_path(fn, loop) == (3, 14 + FALLBACK)
    assert instructions == 14 + FALLBACK
