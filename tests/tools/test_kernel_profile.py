"""The tensor-core loop's fast path (kernel_profile.fast_path) on hand-written SASS."""

from __future__ import annotations

from tilegraph.tools import kernel_profile, sass

FALLBACK = 80  # instructions of a scalar fallback block (>= SKIP_MIN_INSTRUCTIONS)


def _sass(items: list[str]) -> str:
    """nvdisasm-style text of a kernel: ``.L_x_N:`` items are labels, the others instructions at
    consecutive addresses."""
    lines = ["\t.section\t.text.kernel,\"ax\",@progbits", "kernel:"]
    addr = 0
    for item in items:
        if item.endswith(":"):
            lines.append(item)
        else:
            lines.append(f"        /*{addr:04x}*/                   {item} ;")
            addr += 0x10
    return "\n".join(lines) + "\n"


def _kv_block_loop() -> str:
    """A KV-block loop: the next block's copies behind a branch over the last block's wait; Q K^T; a
    NaN check left as a short branch; a fallback block branched around; P V; the back edge."""
    return _sass([
        "S2R R0, SR_TID.X",
        ".L_x_1:",
        "@P3 BRA `(.L_x_4)",  # not the last block: issue the next one
        "DEPBAR.LE SB0, 0x0",
        "BRA `(.L_x_5)",
        ".L_x_4:",
        "LDGSTS.E.BYPASS.128 [R1], desc[UR4][R2.64]",
        "LDGDEPBAR",
        "DEPBAR.LE SB0, 0x1",
        ".L_x_5:",
        "HMMA.16816.F32.BF16 R4, R8, R12, R4",
        "FSETP.NAN.FTZ.AND P0, PT, R7, R7, PT",
        "@P0 BRA `(.L_x_6)",  # the running max is NaN: skip the compare (rare)
        "FSETP.GT.FTZ.AND P1, PT, R5, R6, PT",
        "FSEL R7, R5, R6, P1",
        ".L_x_6:",
        "@!P4 BRA `(.L_x_7)",  # no masked entry next to a non-finite V: skip the fallback
        *["FFMA R20, R21, R22, R20"] * FALLBACK,
        ".L_x_7:",
        "HMMA.16816.F32.BF16 R16, R8, R12, R16",
        "@P5 BRA `(.L_x_1)",
        "EXIT",
    ])  # fmt: skip


def test_fast_path_takes_the_copies_charges_short_skips_and_skips_the_fallback() -> None:
    fn = sass.kernel_function(sass.parse(_kv_block_loop()))
    loop, instructions, flop = kernel_profile.tensor_loop(fn, sass.loops(fn))
    assert len(loop.body) == 14 + FALLBACK
    # branch (1) + the skipped wait charged (2) + the copies (3) + HMMA, NaN test, branch (3) + the
    # compare, run or charged (2) + branch over the fallback (1) + HMMA, back edge (2)
    assert kernel_profile.fast_path(fn, loop) == (2, 14)
    assert instructions == 14


def test_a_fallback_with_the_only_mma_is_on_the_path() -> None:
    """Most HMMA first: a branch around the only tensor-core code is never the fast path."""
    text = _kv_block_loop().replace("FFMA R20, R21, R22, R20", "HMMA.16816.F32.BF16 R20, R8, R12, R20", 1)
    fn = sass.kernel_function(sass.parse(text))
    loop, instructions, flop = kernel_profile.tensor_loop(fn, sass.loops(fn))
    assert kernel_profile.fast_path(fn, loop) == (3, 14 + FALLBACK)
    assert instructions == 14 + FALLBACK


def _stage_of_two_score_tiles() -> str:
    """A KV-stage loop (copies, wait, barrier) around a nested S-tile loop (two HMMA, no copies)."""
    return _sass([
        "S2R R0, SR_TID.X",
        ".L_x_1:",
        "LDGSTS.E.BYPASS.128 [R1], desc[UR4][R2.64]",
        "LDGDEPBAR",
        "DEPBAR.LE SB0, 0x1",
        "BAR.SYNC.DEFER_BLOCKING 0x0",
        ".L_x_2:",
        "HMMA.16816.F32.BF16 R4, R8, R12, R4",
        "FMUL R5, R5, R6",
        "HMMA.16816.F32.BF16 R16, R8, R12, R16",
        "@P4 BRA `(.L_x_2)",
        "BAR.SYNC.DEFER_BLOCKING 0x0",
        "@P5 BRA `(.L_x_1)",
        "EXIT",
    ])  # fmt: skip


def test_a_stage_of_several_score_tiles_charges_the_tile_loop_per_tile() -> None:
    """score_tiles (PerfHints): the stage loop's copies, wait and barriers once per stage, the nested
    S-tile loop's path and FLOP per tile; without the hint the tile loop alone is the math loop."""
    fn = sass.kernel_function(sass.parse(_stage_of_two_score_tiles()))
    tile, tile_instructions, tile_flop = kernel_profile.tensor_loop(fn, sass.loops(fn))
    assert (len(tile.body), tile_instructions) == (4, 4)
    stage, instructions, flop = kernel_profile.tensor_loop(fn, sass.loops(fn), score_tiles=2)
    assert len(stage.body) == 10
    assert instructions == 10 + 4  # the stage's path (one tile included) + the second tile
    assert flop == 2 * tile_flop
    # an unrolled tile loop (copies in the loop holding the HMMA): counted as it is
    unrolled = _kv_block_loop()
    fn = sass.kernel_function(sass.parse(unrolled))
    assert kernel_profile.tensor_loop(fn, sass.loops(fn), score_tiles=2)[1:] == kernel_profile.tensor_loop(fn, sass.loops(fn))[1:]
