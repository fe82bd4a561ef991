"""Where a float32 engine departs from transformers on this machine's default backend.

The engine's transformers tests (tests/test_engine.py, tests/test_lora.py) hold float32 log-probabilities to 1e-4;
on the GPU they failed in session 65 because there EngineConfig's "auto" dtype is bfloat16 (their engines were not
float32; bench/results/f32_parity.md), which this script found by elimination. It takes the
same tiny random checkpoint the tests use and reports, against transformers' float64 log-softmax of its float32
logits on the CPU, the largest log-probability error of: XLA's float32 product under each precision setting (a
512-wide random product against numpy's float64), the dense model (`Qwen2ForCausalLM.apply`, the whole sequence,
XLA only), and the engine's prompt log-probabilities and generated tokens' log-probabilities with the jnp reference
attention and with the Pallas kernels, without and with a LoRA adapter (against transformers with it merged). The
engines run in float32 (``--dtype``; EngineConfig's "auto" is bfloat16 on a GPU).

    python bench/f32_parity.py            # the default backend (the GPU where there is one)
    JAX_PLATFORMS=cpu python bench/f32_parity.py
"""

from __future__ import annotations

import argparse
import tempfile

import jax
import jax.numpy as jnp
import numpy as np


def product_errors() -> dict[str, float]:
    """Relative error of a float32 [512, 512] product under each precision setting, against float64."""
    rng = np.random.default_rng(0)
    a, b = rng.standard_normal((2, 512, 512)).astype(np.float32)
    want = a.astype(np.float64) @ b.astype(np.float64)
    scale = np.abs(want).max()
    out = {}
    for name in ("default", "high", "highest"):
        with jax.default_matmul_precision(name):
            got = np.asarray(jax.jit(jnp.dot)(a, b), np.float64)
        out[f"jnp.dot under {name}"] = float(np.abs(got - want).max() / scale)
    got = np.asarray(jax.jit(lambda x, y: jnp.dot(x, y, precision=jax.lax.Precision.HIGHEST))(a, b), np.float64)
    out["jnp.dot precision=HIGHEST"] = float(np.abs(got - want).max() / scale)
    if jax.default_backend() == "gpu":
        # The engine's prefill and wide decode steps compile with XLA's Triton GEMMs off (runner.PREFILL_OPTIONS,
        # WIDE_DECODE_OPTIONS): cuBLAS takes their products.
        for precision in (jax.lax.Precision.HIGHEST, None):
            f = jax.jit(lambda x, y, p=precision: jnp.dot(x, y, precision=p),
                        compiler_options={"xla_gpu_enable_triton_gemm": False})
            with jax.default_matmul_precision("highest"):
                got = np.asarray(f(a, b), np.float64)
                gemm = [line.strip()[:400] for line in f.lower(a, b).compile().as_text().splitlines()
                        if "custom_call_target" in line or "algorithm" in line]
            out[f"jnp.dot precision={precision}, triton GEMMs off, under highest"] = float(
                np.abs(got - want).max() / scale)
            print("the GEMM XLA compiled:", "\n".join(gemm[:3]))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--precision", default="highest", help="jax_default_matmul_precision for the model runs "
                                                                "(the test suite's conftest sets 'highest')")
    parser.add_argument("--dtype", default="float32", help="the engine's EngineConfig.dtype ('auto' is bfloat16 on a "
                                                           "GPU, float32 on the CPU)")
    args = parser.parse_args()
    print(f"backend {jax.default_backend()} ({jax.devices()[0].device_kind}), jax {jax.__version__}, "
          f"default_matmul_precision before: {jax.config.jax_default_matmul_precision!r}")
    for name, err in product_errors().items():
        print(f"| {name} | relative error {err:.2e} |")
    jax.config.update("jax_default_matmul_precision", args.precision)

    import torch

    import jaxserve
    from jaxserve import Engine, SamplingParams
    from jaxserve.model import Qwen2ForCausalLM
    from tests.conftest import TINY_CHECKPOINT, make_hf_checkpoint

    path = tempfile.mkdtemp()
    hf = make_hf_checkpoint(path, **TINY_CHECKPOINT)
    model = jaxserve.load(path)
    rng = np.random.default_rng(1)
    prompts = [rng.integers(3, model.config.vocab_size, size=n).tolist() for n in (5, 23, 41)]

    def hf_logprobs(ids: list[int], torch_model=hf) -> np.ndarray:
        with torch.no_grad():
            return torch.log_softmax(torch_model(torch.tensor([ids])).logits[0].double(), -1).numpy()

    dense = Qwen2ForCausalLM(model.config)
    apply = jax.jit(lambda p, t: jax.nn.log_softmax(dense.apply({"params": p}, t)[0][0].astype(jnp.float32), -1))
    err = max(float(np.abs(np.asarray(apply(model.params, np.asarray([p], np.int32))) - hf_logprobs(p)).max())
              for p in prompts)
    print(f"| dense model (XLA), every position | max |logprob error| {err:.2e} |")

    from tests.test_engine import small_config
    from tests.test_lora import make_adapter, merged

    make_adapter(f"{path}/lora", hf, seed=1)
    lora = jaxserve.LoRARequest("all", 1, f"{path}/lora")
    with_adapter = merged(hf, f"{path}/lora")
    greedy = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True, logprobs=0, prompt_logprobs=0)
    for impl, adapter in (("reference", None), ("pallas", None), ("reference", lora), ("pallas", lora)):
        # The engine tests' config (tests/test_engine.py), in this run's dtype.
        with Engine(model, small_config(attention_impl=impl, max_loras=1, dtype=args.dtype)) as engine:
            outs = engine.generate(prompts, greedy, use_tqdm=False, lora_request=adapter)
        prompt_err = gen_err = 0.0
        flips = 0
        for p, o in zip(prompts, outs):
            ref = hf_logprobs(p + o["token_ids"], with_adapter if adapter else hf)
            for i in range(1, len(p)):
                prompt_err = max(prompt_err, abs(o["prompt_logprobs"][i][p[i]] - ref[i - 1, p[i]]))
            for j, (t, lp) in enumerate(zip(o["token_ids"], o["logprobs"])):
                gen_err = max(gen_err, abs(lp - ref[len(p) - 1 + j, t]))
                flips += int(t != int(np.argmax(ref[len(p) - 1 + j])))
        print(f"| engine, attention {impl}{', adapter' if adapter else ''} | prompt logprobs {prompt_err:.2e} | "
              f"generated {gen_err:.2e} | tokens not transformers' argmax given the same prefix: {flips} |")


if __name__ == "__main__":
    main()
