"""The benchmark scripts run only on the GPU machine, so CI would not notice one that no
longer parses; compiling each catches that much here."""

from __future__ import annotations

import pathlib
import py_compile

import pytest

BENCH = sorted((pathlib.Path(__file__).parent.parent / "bench").glob("*.py"))


@pytest.mark.parametrize("script", BENCH, ids=[p.name for p in BENCH])
def test_bench_script_compiles(script, tmp_path):
    py_compile.compile(str(script), cfile=str(tmp_path / "out.pyc"), doraise=True)


def test_engine_timeline_attributes_idle_gaps_to_host_phases():
    """The timeline's arithmetic on a made-up trace: busy time is the union of overlapping
    kernels, and each gap goes to the innermost engine phase open when it began."""
    import sys

    sys.path.insert(0, str(pathlib.Path(__file__).parent.parent))
    from bench.engine_timeline import summarize

    kernels = [dict(ts=0, dur=100, name="a"), dict(ts=50, dur=100, name="b"),  # overlap: busy 0-150
               dict(ts=400, dur=100, name="c"), dict(ts=503, dur=97, name="d")]  # 250 µs gap, then 3 µs
    host = [dict(ph="X", ts=0, dur=1000, name="engine.step"),
            dict(ph="X", ts=140, dur=300, name="engine.collect_decode")]
    lines = summarize(kernels, host, wall_s=1e-3, min_gap_us=5)
    text = "\n".join(lines)
    assert "GPU busy 0.3 ms (4 kernels)" in text
    assert "1 gaps of >= 5 µs, 0.25 ms" in text and "shorter gaps 0.00 ms" in text
    assert "| collect_decode | 1 | 0.25 | 250 |" in text
    assert "| 0.15 | 250 | collect_decode | b | c |" in text


def test_decode_profile_counts_kernels_that_start_early():
    """decode_step's overlap count on a made-up stream: a kernel that starts before the one ahead
    of it ended (what a programmatic dependent launch allows) counts, with the µs it overlaps."""
    import sys

    sys.path.insert(0, str(pathlib.Path(__file__).parent.parent))
    from bench.decode_step import kernel_overlaps

    kernels = [dict(ts=10, dur=20), dict(ts=25, dur=10),  # starts 5 µs before the first ends
               dict(ts=40, dur=5), dict(ts=41, dur=2)]     # inside the third: its whole 2 µs
    assert kernel_overlaps(kernels) == (35.0, 2, 7.0)
    assert kernel_overlaps([]) == (0.0, 0, 0.0)


def test_ncu_hotspots_ranks_instructions_by_stall_samples():
    """ncu_hotspots on a made-up source-page CSV: per kernel table, instructions by stall
    samples with their biggest reasons; rows that do not fit the table end it."""
    import sys

    sys.path.insert(0, str(pathlib.Path(__file__).parent.parent))
    from bench.ncu_hotspots import hotspots

    text = "\n".join([
        '"Kernel Name","skinny_mgpu_swiglu"',
        '"Address","Source","Warp Stall Sampling (All Samples)","stall_long_sb","stall_barrier"',
        '"0x10","LDG.E R0, [R2]","30","25","5"',
        '"0x20","SYNCS.ARRIVE","60","0","60"',
        '"0x30","FFMA R1, R1, R0","10","0","0"',
        '',
        '"not","a row"',
    ])
    lines = hotspots(text, top=2)
    assert lines[0].startswith("== \"Kernel Name\",\"skinny_mgpu_swiglu\": 3 instructions, 100 stall samples")
    assert "60.0%" in lines[1] and "SYNCS.ARRIVE" in lines[1] and "stall_barrier 60" in lines[1]
    assert "30.0%" in lines[2] and "stall_long_sb 25, stall_barrier 5" in lines[2]
    assert len(lines) == 3


def test_ncu_opcode_mix_sums_instructions_by_opcode():
    """opcode_mix on a made-up source-page CSV: executed warp instructions summed by opcode,
    predicates and modifiers dropped, ranked by share."""
    import sys

    sys.path.insert(0, str(pathlib.Path(__file__).parent.parent))
    from bench.ncu_hotspots import opcode_mix

    text = "\n".join([
        '"Kernel Name","fused_decode_attention"',
        '"Address","Source","Instructions Executed","Warp Stall Sampling (All Samples)"',
        '"0x10","LDG.E.128 R0, [R2.64]","300","5"',
        '"0x20","@P0 LDG.E R4, [R2.64]","100","1"',
        '"0x30","HMMA.16816.F32.BF16 R8, R4, R6, R8","500","2"',
        '"0x40","FFMA R1, R1, R0","100","0"',
        '',
    ])
    lines = opcode_mix(text)
    assert lines[0].endswith(": 1000 warp instructions executed")
    assert lines[1].split() == ["50.0%", "HMMA", "500"]
    assert lines[2].split() == ["40.0%", "LDG", "400"]
    assert lines[3].split() == ["10.0%", "FFMA", "100"]
    assert len(lines) == 4


def test_kernel_floor_times_a_chain_and_counts_its_loop_kernels():
    """kernel_floor on the CPU at a toy size: a positive time a matrix, and the loop body's kernels found in the
    compiled HLO (the GPU table reports them so that a chain XLA split or merged is seen)."""
    import sys

    sys.path.insert(0, str(pathlib.Path(__file__).parent.parent))
    from bench.kernel_floor import chain_us, launches_per_iteration

    us, launches, mb = chain_us(0.05, matrices=3, reps=2, rounds=1)
    assert us > 0 and launches >= 3 and mb == 27 * 896 * 2 / 1e6  # whole rows of 896: 27 of them
    text = "ENTRY %main (a: f32[]) -> f32[] {\n  %w = while(%t), condition=%cond, body=%body.1\n}\n" \
           "%body.1 (p: (s32[])) -> (s32[]) {\n  %f = f32[] fusion(%p), kind=kLoop\n" \
           "  %c = f32[] custom-call(%f), custom_call_target=\"x\"\n}\n"
    assert launches_per_iteration(text) == 2


def test_kernel_floor_pdl_kernel_lowers_for_cuda_with_its_grid_dependency_ops_in_order(tmp_path):
    """The griddepcontrol variant of kernel_floor's streaming kernel (`--pdl`, compiled only) lowers for CUDA on the
    CPU, its Triton IR holding launch_dependents before wait."""
    import sys

    sys.path.insert(0, str(pathlib.Path(__file__).parent.parent))
    import jax
    import jax.numpy as jnp

    from bench.kernel_floor import _stream_kernel_pdl, stream_call
    from bench.triton_registers import capture_triton_modules

    call = stream_call(_stream_kernel_pdl, blocks=4, rows=2, width=4096, interpret=False)
    with capture_triton_modules(str(tmp_path)) as seen:
        jax.jit(call).trace(jax.ShapeDtypeStruct((4, 16), jnp.float32),
                            jax.ShapeDtypeStruct((8, 4096), jnp.bfloat16)).lower(lowering_platforms=("cuda",))
    ir = pathlib.Path(seen[-1]["path"]).read_text()
    assert 0 <= ir.index("griddepcontrol.launch_dependents") < ir.index("griddepcontrol.wait")


@pytest.mark.parametrize("prefetch", [False, True])
def test_kernel_floor_loop_kernel_sums_each_programs_strided_blocks(prefetch):
    """The fixed-grid streaming kernel of `kernel_floor --loop` reads the blocks it claims to (program p: blocks p,
    p + P, ...), so the bytes its table divides by are the bytes it streams; output poisoned first."""
    import sys

    sys.path.insert(0, str(pathlib.Path(__file__).parent.parent))
    import jax
    import jax.numpy as jnp
    import numpy as np

    from bench.kernel_floor import loop_call, parse_loop_form

    programs, rows, iters, width = 3, 2, 4, 4096
    x = jax.random.normal(jax.random.key(np.random.randint(1 << 30)), (programs * iters * rows, width), jnp.bfloat16)
    prev = jnp.full((programs, 16), jnp.nan, jnp.float32).at[0].set(0.0)  # only row 0 is read, times 0
    out = loop_call(programs, rows, iters, stages=1, warps=4, prefetch=prefetch, interpret=True)(prev, x)
    blocks = np.asarray(x, np.float32).reshape(iters, programs, rows, width)
    want = blocks.sum(axis=(0, 2, 3))
    np.testing.assert_allclose(np.asarray(out), np.broadcast_to(want[:, None], (programs, 16)), rtol=1e-5, atol=1e-2)
    assert parse_loop_form("p1056r2s1w4f") == dict(programs=1056, rows=2, stages=1, warps=4, prefetch=True)
    with pytest.raises(ValueError, match="--loop form"):
        parse_loop_form("p1056r2")


def test_structured_bench_smoke_runs_on_the_cpu(tmp_path):
    """bench/structured.py end to end on a tiny model (what gpu_checks.sh struct45 runs at full size): every row
    written, every constrained output valid."""
    import subprocess
    import sys

    root = pathlib.Path(__file__).parent.parent
    done = subprocess.run([sys.executable, str(root / "bench" / "structured.py"), "--tiny", "--batches", "2",
                           "--output-len", "12", "--repeats", "2", "--out", str(tmp_path)], capture_output=True,
                          text=True, timeout=300, cwd=root)
    assert done.returncode == 0, done.stderr[-2000:]
    table = (tmp_path / "structured.md").read_text()
    assert [line.split("|")[2].strip() for line in table.splitlines() if line.startswith("| 2 |")] == [
        "none", "regex", "json"]
    assert table.count("2/2 outputs valid") == 2


def test_structured_bench_mixes_compile_one_guided_decode_shape(tmp_path):
    """bench/structured.py --mixes (gpu_checks.sh mixes46 at full size): rounds of different mixes of constraints
    compile one guided decode shape (the guide pool's)."""
    import subprocess
    import sys

    root = pathlib.Path(__file__).parent.parent
    done = subprocess.run([sys.executable, str(root / "bench" / "structured.py"), "--tiny", "--mixes", "4",
                           "--rounds", "4", "--batches", "4", "--output-len", "4", "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=300, cwd=root)
    assert done.returncode == 0, done.stderr[-2000:]
    table = (tmp_path / "structured.md").read_text()
    assert len([line for line in table.splitlines() if line.startswith("| ") and line[2].isdigit()]) == 4
    assert "4 rounds:" in table and table.rstrip().endswith("1 guided decode shapes compiled"), table


def test_replicas_bench_smoke_runs_on_two_cpu_devices(tmp_path):
    """bench/replicas.py (gpu_checks.sh dp46 on two GPUs) end to end on a tiny model and two fake CPU devices."""
    import subprocess
    import sys

    root = pathlib.Path(__file__).parent.parent
    done = subprocess.run([sys.executable, str(root / "bench" / "replicas.py"), "--tiny", "--cpu-devices", "2",
                           "--devices", "1", "2", "--rows", "4", "--requests", "8", "--output-len", "4",
                           "--prompt-len", "32", "--out", str(tmp_path)], capture_output=True, text=True, timeout=300,
                          cwd=root)
    assert done.returncode == 0, done.stderr[-2000:]
    rows = [line.split("|") for line in (tmp_path / "replicas.md").read_text().splitlines() if line.startswith("| ")]
    assert [r[1].strip() for r in rows[1:]] == ["1", "2"] and rows[-1][6].strip().count("/") == 1, rows


def test_tensor_parallel_bench_smoke_runs_on_two_cpu_devices(tmp_path):
    """bench/tensor_parallel.py (gpu_checks.sh tp50 on two GPUs, fp8_50 on one) on a tiny model and two fake CPU
    devices: a row for each split and weights, the split's greedy tokens the single device's (float32 here)."""
    import subprocess
    import sys

    root = pathlib.Path(__file__).parent.parent
    done = subprocess.run([sys.executable, str(root / "bench" / "tensor_parallel.py"), "--shape", "tiny",
                           "--cpu-devices", "2", "--tp", "1", "2", "--quantization", "none", "fp8", "--batches", "2",
                           "--prompt-len", "16", "--output-len", "4", "--out", str(tmp_path)], capture_output=True,
                          text=True, timeout=300, cwd=root)
    assert done.returncode == 0, done.stderr[-2000:]
    rows = [line.split("|") for line in (tmp_path / "tensor_parallel.md").read_text().splitlines()
            if line.startswith("| ")]
    assert [(r[2].strip(), r[3].strip()) for r in rows[1:]] == [("1", "bf16"), ("1", "fp8"), ("2", "bf16"),
                                                                  ("2", "fp8")], rows
    assert rows[3][7].strip() == "2/2", rows  # split bf16 gives one device's tokens (float32 here)


def test_speculative_bench_smoke_gives_the_same_tokens(tmp_path):
    """bench/speculative.py (gpu_checks.sh spec47 at full size) on a tiny random model: with and without speculation
    the same greedy tokens, and the repeated prompt block gives drafts that some verify calls accept."""
    import subprocess
    import sys

    root = pathlib.Path(__file__).parent.parent
    done = subprocess.run([sys.executable, str(root / "bench" / "speculative.py"), "--workload", "repeat", "--shape",
                           "tiny", "--k", "3", "--batch", "2", "--prompt-len", "30", "--output-len", "12", "--out",
                           str(tmp_path)], capture_output=True, text=True, timeout=300, cwd=root)
    assert done.returncode == 0, done.stderr[-2000:]
    rows = [line.split("|") for line in (tmp_path / "speculative.md").read_text().splitlines() if line.startswith("| ")]
    assert [(r[1].strip(), r[2].strip()) for r in rows[1:]] == [("2", "0"), ("2", "3")], rows
    assert all(r[9].strip() == "yes" for r in rows[1:]) and int(rows[2][5]) > 0, rows


def test_embed_bench_smoke_embeds_every_prompt(tmp_path):
    """bench/embed.py (gpu_checks.sh embed49 at full size) on a tiny random model: each case's row, every
    embedding at unit length (the script checks)."""
    import subprocess
    import sys

    root = pathlib.Path(__file__).parent.parent
    done = subprocess.run([sys.executable, str(root / "bench" / "embed.py"), "--shape", "tiny", "--batch", "4",
                           "--prompt-len", "24", "--rounds", "1", "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=300, cwd=root)
    assert done.returncode == 0, done.stderr[-2000:]
    rows = [line.split("|") for line in (tmp_path / "embed.md").read_text().splitlines() if line.startswith("| ")]
    assert [r[3].strip() for r in rows[1:]] == ["prefill + 1 token", "embed, last token", "embed, mean"], rows
