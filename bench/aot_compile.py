"""Compile the Qwen-shape decode step for a Hopper GPU on a machine without one (XLA's deviceless AOT).

Device time is scarce; XLA's GPU compiler is not. With JAX >= 0.11 and its CUDA plugin installed on a
CPU machine, a compile-only CUDA "topology" built from a GPU target description stands in for the
H100 / H200, and `jax.jit(...).lower(...).compile()` runs XLA's whole GPU pipeline: HLO passes,
fusion, the Triton kernels' lowering through XLA's Triton and LLVM, buffer assignment and the thunk
sequence. It does not run what needs the card: GEMM autotuning (XLA keeps its default tiling),
Mosaic GPU kernels' compiles (done when the executable is loaded) or anything at run time.

Per shape and batch it prints the lower / compile seconds, the kernels one step launches (the thunk
sequence: Triton kernels and XLA fusions by name, with grid, threads and shared memory; Mosaic GPU
calls appear as custom calls) and the step's peak device memory as XLA assigned it.

Set-up (a CPU machine; Python 3.12, as on the device):

    python3.12 -m venv /tmp/v12 && . /tmp/v12/bin/activate
    pip install "jax==0.11.2" "jax-cuda13-plugin==0.11.2" "jax-cuda13-pjrt==0.11.2" flax pytest \
        hypothesis chex transformers safetensors tokenizers
    python bench/aot_compile.py --shapes 7B --batches 1 64 256 --kernels

Session 34 (bench/results/model_shapes.md): every Qwen2.5 shape at 1 / 64 / 256 rows compiles in
under 3 s this way, so XLA's compile of the Triton kernels is not what kept two steps from finishing
on the H200.
"""

from __future__ import annotations

import argparse
import faulthandler
import glob
import importlib
import os
import re
import sys
import tempfile
import time

# Before JAX is imported: the plugin's CUDA-library version check fails where no CUDA is installed.
os.environ.setdefault("JAX_SKIP_CUDA_CONSTRAINTS_CHECK", "1")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# XLA's GpuTargetConfigProto (text) for an H200 (an H100 SXM but for memory): what the compile-only
# device reports to XLA's cost models and tilings.
H200_TARGET = """
gpu_device_info {
  cuda_compute_capability { major: 9 minor: 0 }
  threads_per_block_limit: 1024
  threads_per_warp: 32
  shared_memory_per_block: 49152
  shared_memory_per_block_optin: 232448
  shared_memory_per_core: 233472
  threads_per_core_limit: 2048
  core_count: 132
  fpus_per_core: 128
  block_dim_limit_x: 2147483647
  block_dim_limit_y: 65535
  block_dim_limit_z: 65535
  memory_bandwidth: 4800000000000
  l2_cache_size: 52428800
  clock_rate_ghz: 1.98
  device_memory_size: 150000000000
  registers_per_core_limit: 65536
  registers_per_block_limit: 65536
}
platform_name: "CUDA"
dnn_version_info { major: 9 minor: 10 patch: 0 }
device_description_str: "NVIDIA H200"
"""


def compile_only_device():
    """A CUDA device that compiles but never runs (XLA's deviceless topology)."""
    from jax.experimental import topologies

    try:
        topology = topologies.get_topology_desc(platform="cuda", topology_name="aot", topology="1x1x1",
                                                target_config=H200_TARGET)
    except (NotImplementedError, RuntimeError) as exc:
        raise SystemExit(f"no compile-only CUDA topology ({exc}): install JAX >= 0.11 with its CUDA plugin "
                         "(see this script's docstring)") from exc
    return topology.devices[0]


def _target_pallas_triton_at_h200() -> None:
    # Pallas's Triton lowering asks the default device for its compute capability; here that is the
    # CPU. (A private module: the abstract-mesh route it suggests instead does not reach AOT compiles.)
    from jax._src.pallas.triton import gpu_info

    gpu_info.get_gpu_info = lambda: gpu_info.get_gpu_info_from_version(gpu_info.GpuVersion.H200)


def compile_step(shape: str, batch: int, impl: str, device, dump_dir: str) -> dict:
    import jax
    import jax.numpy as jnp
    from jax.sharding import SingleDeviceSharding

    from jaxserve.model import PagedAttention, Qwen2ForCausalLM, init_params, new_kv_cache
    from tests.test_qwen_shapes import PAGE_SIZE, TABLE_PAGES, qwen_shape_config

    cfg = qwen_shape_config(shape)
    model = Qwen2ForCausalLM(cfg, jnp.bfloat16)
    on_device = SingleDeviceSharding(device)

    def abstract(tree):
        return jax.tree_util.tree_map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=on_device), tree)

    params = abstract(jax.eval_shape(lambda: init_params(cfg, jax.random.key(0), jnp.bfloat16)))
    kv = abstract(jax.eval_shape(lambda: new_kv_cache(cfg, batch * TABLE_PAGES, PAGE_SIZE, jnp.bfloat16)))
    ints = [jax.ShapeDtypeStruct(s, jnp.int32, sharding=on_device)
            for s in ((batch, 1), (batch, 1), (batch, 1), (batch, TABLE_PAGES), (batch,))]

    def step(params, kv, tokens, positions, slots, tables, lengths):
        paged = PagedAttention(slots, tables, lengths, lengths - 1, impl=impl)
        return model.apply({"params": params}, tokens, positions, kv=kv, paged=paged, logits_dtype=None)

    t0 = time.perf_counter()
    lowered = jax.jit(step, donate_argnums=1).trace(params, kv, *ints).lower()
    t1 = time.perf_counter()
    compiled = lowered.compile({"xla_dump_to": dump_dir})
    t2 = time.perf_counter()
    memory = compiled.memory_analysis()
    peak = getattr(memory, "peak_memory_in_bytes", None) if memory is not None else None
    return dict(lower_s=t1 - t0, compile_s=t2 - t1, peak_bytes=peak)


def thunks(dump_dir: str) -> list[str]:
    """The compiled step's thunk sequence: one line a kernel launch or custom call, in order."""
    [path] = glob.glob(os.path.join(dump_dir, "*jit_step*thunk_sequence.txt"))
    lines = []
    for line in open(path):
        # "003: kCustomKernel [prev=002 (1) | next=004 (1)] add_rms_norm grid: [...] ..."
        body = re.sub(r"^\d+:\s*(\w+)\s*\[[^\]]*\]\s*", r"\1 ", line.strip())
        lines.append(body)
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", nargs="+", default=["0.5B", "1.5B", "3B", "7B"])
    ap.add_argument("--batches", nargs="+", type=int, default=[1, 64, 256])
    ap.add_argument("--impl", default="pallas", choices=["pallas", "reference"])
    ap.add_argument("--kernels", action="store_true", help="print each step's kernels (grid, threads, shared memory)")
    ap.add_argument("--limit", type=float, default=300.0, help="seconds before the Python stack is dumped and it exits")
    args = ap.parse_args()
    faulthandler.dump_traceback_later(args.limit, exit=True)

    import jax

    compat = importlib.import_module("jaxserve_kernels.pallas_compat")
    compat.resolve_interpret = lambda interpret: bool(interpret)  # the kernels as the GPU runs them
    _target_pallas_triton_at_h200()
    device = compile_only_device()
    print(f"jax {jax.__version__}, compile-only device: {device.device_kind}, impl {args.impl}")
    print("| shape | batch | lower s | compile s | launches a step | Mosaic GPU calls | peak MiB |")
    print("|---|---|---|---|---|---|---|", flush=True)
    details = []
    for shape in args.shapes:
        for batch in args.batches:
            with tempfile.TemporaryDirectory() as dump_dir:
                result = compile_step(shape, batch, args.impl, device, dump_dir)
                seq = thunks(dump_dir)
            customs = sum(line.startswith("kCustomCall") for line in seq)
            peak = "" if result["peak_bytes"] is None else f"{result['peak_bytes'] / 2**20:.0f}"
            print(f"| {shape} | {batch} | {result['lower_s']:.1f} | {result['compile_s']:.1f} | {len(seq)} | "
                  f"{customs} | {peak} |", flush=True)
            details.append((shape, batch, seq))
    if args.kernels:
        for shape, batch, seq in details:
            print(f"\n{shape}, {batch} rows (two layers):")
            counts: dict[str, int] = {}
            for line in seq:
                counts[line] = counts.get(line, 0) + 1
            for line, n in counts.items():
                print(f"  {n} x {line}")


if __name__ == "__main__":
    main()
