"""vLLM's offline ``LLM`` class over a jaxserve `Engine`: ``from jaxserve import LLM, SamplingParams`` in place of
``from vllm import LLM, SamplingParams``, and a script written for vLLM runs as it is.

Why: most offline inference code in the wild is written against vLLM's ``LLM(model=...).generate(prompts, params)``
and reads ``outputs[0].outputs[0].text``. jaxserve's own API (`jaxserve.generate`, `Engine.generate`) returns plain
dicts; this module only translates: vLLM's engine arguments to an `EngineConfig` (an argument jaxserve has no
counterpart for is a ``TypeError`` naming it, not silently dropped) and the result dicts to vLLM's output objects.

Example:
    >>> from jaxserve import LLM, SamplingParams
    >>> llm = LLM()  # the embedded default model; LLM("Qwen/Qwen2.5-0.5B-Instruct") for a checkpoint folder
    >>> out = llm.generate(["def add(a, b):"], SamplingParams(max_tokens=8, temperature=0), use_tqdm=False)
    >>> out[0].outputs[0].finish_reason in ("stop", "length")
    True
"""

from __future__ import annotations

import dataclasses
import functools
import os
from collections.abc import Mapping
from typing import Any, Callable, Sequence

import numpy as np

from jaxserve.engine import Engine, Prompt, loras_per_prompt, prompt_list, sample_requests
from jaxserve.engine_config import EngineConfig
from jaxserve.lora import LoRARequest
from jaxserve.pooling import PoolingParams
from jaxserve.request import best_first
from jaxserve.sampling import RequestOutputKind, SamplingParams

# vLLM's engine arguments -> EngineConfig fields (the same meaning; vLLM's names).
_ENGINE_ARGS = {"max_num_seqs": "max_running", "max_num_batched_tokens": "max_tokens_per_step",
                "block_size": "page_size", "max_model_len": "max_model_len", "dtype": "dtype",
                "enable_prefix_caching": "prefix_caching", "gpu_memory_utilization": "memory_fraction",
                "tensor_parallel_size": "tensor_parallel_size", "quantization": "quantization", "seed": "seed",
                "max_loras": "max_loras", "max_lora_rank": "max_lora_rank", "scheduling_policy": "scheduling_policy",
                "num_gpu_blocks_override": "num_pages", "kv_cache_dtype": "kv_cache_dtype"}
# vLLM's arguments that change nothing here (what jaxserve does anyway, or a setting of vLLM's own machinery).
# max_cpu_loras: vLLM's cap on adapters cached in host memory; jaxserve keeps each registered adapter's host copy
# until it is unloaded.
# enable_sleep_mode / enable_prompt_embeds: jaxserve's engines always sleep and take prompt embeddings.
_NO_OPS = ("trust_remote_code", "enforce_eager", "disable_log_stats", "swap_space", "tokenizer_mode",
           "disable_custom_all_reduce", "disable_async_output_proc", "compilation_config", "load_format",
           "distributed_executor_backend", "max_seq_len_to_capture", "download_dir", "max_cpu_loras",
           "enable_sleep_mode", "enable_prompt_embeds")
# vLLM's arguments taken at the value that is what jaxserve does (any other is a TypeError naming it). Adapters are
# held in the model's dtype ("auto"), their products unsharded past tensor parallelism's column split.
# generation_config "auto": the checkpoint's generation_config.json defaults, which jaxserve always reads. task /
# runner: what the checkpoint is decides here (a causal LM generates and embeds, a classifier classifies), so vLLM's
# values for those are taken; its other runners and converters are not.
_ONLY = {"pipeline_parallel_size": (1,), "cpu_offload_gb": (0,), "lora_dtype": ("auto", None),
         "fully_sharded_loras": (False,), "data_parallel_size": (1,), "generation_config": ("auto",),
         "tokenizer": (None,), "revision": (None,), "tokenizer_revision": (None,), "code_revision": (None,),
         "hf_overrides": (None, {}), "logits_processors": (None, [], ()),
         "task": ("auto", "generate", "embed", "classify", "score"), "runner": ("auto", "generate", "pooling")}
# vLLM's dtype spellings that are torch's names of jaxserve's.
_DTYPE_ALIASES = {"float": "float32", "bf16": "bfloat16"}


@dataclasses.dataclass
class Logprob:
    """vLLM's: a token's log-probability, its rank among the step's tokens (1 = likeliest; None where unknown) and
    its text."""

    logprob: float
    rank: int | None = None
    decoded_token: str | None = None


@dataclasses.dataclass
class CompletionOutput:
    """vLLM's: one sample of a prompt."""

    index: int
    text: str
    token_ids: list[int]
    cumulative_logprob: float | None
    logprobs: list[dict[int, Logprob]] | None
    finish_reason: str | None
    stop_reason: int | str | None = None
    lora_request: LoRARequest | None = None

    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclasses.dataclass
class RequestOutput:
    """vLLM's: a prompt and its samples (``n`` of them)."""

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int] | None  # None for a prompt given as embeddings
    prompt_logprobs: list[dict[int, Logprob] | None] | None
    outputs: list[CompletionOutput]
    finished: bool = True
    num_cached_tokens: int = 0
    lora_request: LoRARequest | None = None
    # vLLM's fields of what jaxserve does not run (encoder-decoder models, disaggregated prefill, its v0 metrics
    # object: the result dicts' ttft / tpot are the timings here): always None.
    metrics: Any = None
    encoder_prompt: str | None = None
    encoder_prompt_token_ids: list[int] | None = None
    kv_transfer_params: dict[str, Any] | None = None


@dataclasses.dataclass
class BeamSearchSequence:
    """vLLM's: one beam, ``tokens`` the prompt's and the generated ones, ``text`` all of them decoded (as vLLM's),
    ``logprobs`` each generated token's ``{token: Logprob}``."""

    tokens: list[int]
    logprobs: list[dict[int, Logprob]]
    lora_request: LoRARequest | None = None
    cum_logprob: float = 0.0
    text: str | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None


@dataclasses.dataclass
class BeamSearchOutput:
    """vLLM's ``LLM.beam_search`` result: a prompt's beams, best first."""

    sequences: list[BeamSearchSequence]


@dataclasses.dataclass
class EmbeddingOutput:
    embedding: list[float]


@dataclasses.dataclass
class EmbeddingRequestOutput:
    """vLLM's ``LLM.embed`` result: ``outputs.embedding``."""

    request_id: str
    prompt_token_ids: list[int]
    outputs: EmbeddingOutput
    finished: bool = True


@dataclasses.dataclass
class PoolingOutput:
    """vLLM's: a prompt's pooled output (a float32 array where vLLM's is a torch tensor)."""

    data: Any


@dataclasses.dataclass
class PoolingRequestOutput:
    """vLLM's ``LLM.encode`` result: ``outputs.data`` a prompt."""

    request_id: str
    prompt_token_ids: list[int]
    outputs: PoolingOutput
    finished: bool = True


@dataclasses.dataclass
class ClassificationOutput:
    probs: list[float]

    @property
    def num_classes(self) -> int:
        return len(self.probs)


@dataclasses.dataclass
class ClassificationRequestOutput:
    """vLLM's ``LLM.classify`` result: ``outputs.probs``."""

    request_id: str
    prompt_token_ids: list[int]
    outputs: ClassificationOutput
    finished: bool = True


@dataclasses.dataclass
class ScoringOutput:
    score: float


@dataclasses.dataclass
class ScoringRequestOutput:
    """vLLM's ``LLM.score`` result: ``outputs.score`` a pair."""

    request_id: str
    outputs: ScoringOutput
    finished: bool = True


@dataclasses.dataclass
class Metric:
    """vLLM's ``vllm.v1.metrics.reader.Metric``: a metric's name (vLLM's ``vllm:`` names) and labels."""

    name: str
    labels: dict[str, str]


@dataclasses.dataclass
class Counter(Metric):
    """A count that only grows (vLLM's reader's ``Counter``)."""

    value: int


@dataclasses.dataclass
class Gauge(Metric):
    """A level (vLLM's reader's ``Gauge``)."""

    value: float


def engine_config_from_vllm(**kwargs: Any) -> EngineConfig:
    """vLLM's ``LLM`` / ``EngineArgs`` keyword arguments as an `EngineConfig` (`TypeError` naming any jaxserve has no
    counterpart for; `EngineConfig`'s own checks for bad values, their `ValueError` led by vLLM's name of the argument).

    Example:
        >>> engine_config_from_vllm(max_num_seqs=32, block_size=32, enable_prefix_caching=False).max_running
        32
    """
    fields: dict[str, Any] = {}
    for name, value in kwargs.items():
        if name in _NO_OPS:
            continue
        if name in _ONLY:
            if value not in _ONLY[name]:
                raise TypeError(f"LLM(): jaxserve takes {name!r} only as {_ONLY[name][0]}, got {value!r}")
        elif name == "enable_chunked_prefill":  # vLLM's chunked prefill: the "mixed" policy (`EngineConfig.policy`)
            if value:
                fields["policy"] = "mixed"
        elif name == "max_logprobs":  # vLLM's cap on a request's logprobs; jaxserve's is fixed
            from jaxserve.engine import MAX_TOP_LOGPROBS

            if isinstance(value, bool) or not isinstance(value, int):
                raise ValueError(f"max_logprobs must be an int, got {value!r}")
            if value > MAX_TOP_LOGPROBS:
                raise TypeError(f"LLM(): 'max_logprobs' above jaxserve's {MAX_TOP_LOGPROBS}, got {value!r}")
        elif name == "enable_lora":
            fields.setdefault("max_loras", 1 if value else 0)
        elif name == "speculative_config":
            if value is not None and not isinstance(value, Mapping):
                raise ValueError(f"speculative_config must be a dict (vLLM's), got {value!r}")
            spec = dict(value or {})
            if spec.pop("method", "ngram") != "ngram":
                raise TypeError("speculative_config: only method 'ngram' is served")
            keys = {"num_speculative_tokens": "speculative_tokens", "prompt_lookup_max": "prompt_lookup_max",
                    "prompt_lookup_min": "prompt_lookup_min",
                    "disable_by_batch_size": "speculative_disable_by_batch_size"}
            unknown = set(spec) - set(keys)
            if unknown:
                raise TypeError(f"speculative_config: unknown keys {sorted(unknown)}")
            fields.update({keys[k]: v for k, v in spec.items()})
        elif name in _ENGINE_ARGS:
            if name == "dtype" and isinstance(value, str):
                if value in ("half", "float16"):
                    raise ValueError(f"dtype: jaxserve computes in float32 or bfloat16 (Qwen2's own), not float16, "
                                     f"got {value!r}")
                value = _DTYPE_ALIASES.get(value, value)
            if value is not None or name in ("quantization", "seed", "max_model_len"):
                fields[_ENGINE_ARGS[name]] = value
        else:
            raise TypeError(f"LLM() got an argument jaxserve has no counterpart for: {name!r}")
    try:
        return EngineConfig(**fields)
    except ValueError as exc:
        # EngineConfig names its own field ("memory_fraction ..."); a vLLM script knows it by vLLM's name.
        message = str(exc)
        for vllm_name, field in _ENGINE_ARGS.items():
            if vllm_name in kwargs and vllm_name != field and message.startswith(field + " "):
                raise ValueError(f"{vllm_name}: jaxserve's {message}") from None
        raise


class LLM:
    """vLLM's offline ``LLM``: a model and an engine (`jaxserve.Engine`), with ``generate``, ``chat``, ``embed``,
    ``classify``, ``score``, ``beam_search``, ``get_tokenizer``, ``get_default_sampling_params``,
    ``reset_prefix_cache``, ``sleep`` / ``wake_up``, and ``update_params`` (new weights). ``model`` is a checkpoint
    folder (Hugging Face or converted), a `jaxserve.LoadedModel`, or None for the embedded default model; the other
    keywords are vLLM's engine arguments (`engine_config_from_vllm`), or ``engine_config`` directly.

    Example:
        >>> llm = LLM("/models/Qwen2.5-0.5B-Instruct", max_model_len=4096, gpu_memory_utilization=0.8)  # doctest: +SKIP
        >>> llm.chat([{"role": "user", "content": "Hi!"}])[0].outputs[0].text                        # doctest: +SKIP
    """

    def __init__(self, model: str | os.PathLike | Any | None = None, *, engine_config: EngineConfig | None = None,
                 **engine_args: Any) -> None:
        if engine_config is not None and engine_args:
            raise TypeError("give engine_config or vLLM's engine arguments, not both")
        # vLLM's default seed (0 since v0.9's v1 engine): a script's unseeded sampling repeats from run to run.
        engine_args.setdefault("seed", 0)
        self.engine = Engine(model, engine_config or engine_config_from_vllm(**engine_args))
        # vLLM's offline engine ends a request at max_model_len ("length") where its max_tokens would pass it.
        self.engine.cap_max_tokens = True
        self.engine.request_id_prefix = ""  # vLLM's LLM numbers its requests "0", "1", ...
        # `get_metrics`' counts of what this LLM answered: prompt and generated tokens, requests by finish reason.
        self._counts: dict[str, Any] = {"prompt": 0, "generation": 0, "finished": {}}
        tokenizer = self.engine.tokenizer
        # Each logprob dict names its tokens' text: n samples' top-k over a run repeat few distinct tokens.
        self._decode = (functools.cache(lambda t: tokenizer.decode([t])) if tokenizer is not None
                        else lambda t: None)

    def __enter__(self) -> "LLM":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def close(self) -> None:
        self.engine.close()

    def get_tokenizer(self) -> Any:
        return self.engine.tokenizer

    def generate(self, prompts: Prompt | Sequence[Prompt], sampling_params: SamplingParams | Sequence[SamplingParams]
                 | None = None, use_tqdm: bool = True,
                 lora_request: LoRARequest | Sequence[LoRARequest | None] | None = None,
                 priority: Sequence[int] | None = None) -> list[RequestOutput]:
        """vLLM's ``LLM.generate``: one `RequestOutput` a prompt, in order (`Engine.generate` underneath)."""
        prompts = prompt_list(prompts)
        results = self.engine.generate(prompts, sampling_params, use_tqdm=use_tqdm, priority=priority,
                                       lora_request=lora_request)
        loras = loras_per_prompt(lora_request, len(prompts))
        return [self._request_output(p, r, lora) for p, r, lora in zip(prompts, results, loras)]

    def chat(self, messages: Any, sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
             use_tqdm: bool = True, **template_options: Any) -> list[RequestOutput]:
        """vLLM's ``LLM.chat``: one conversation or a list of them (`Engine.chat`'s template options:
        ``chat_template``, ``add_generation_prompt``, ``continue_final_message``, ``tools``, ``chat_template_kwargs``,
        ``lora_request``)."""
        # vLLM's "string" is how the messages reach the template here (text parts joined); "auto" picks it for
        # Qwen2's template, which reads a message's content as a string.
        content_format = template_options.pop("chat_template_content_format", "auto")
        if content_format not in ("auto", "string"):
            raise ValueError(f"chat_template_content_format must be 'auto' or 'string' (Qwen2's templates read "
                             f"text), got {content_format!r}")
        conversations = [messages] if messages and isinstance(messages[0], dict) else list(messages)
        results = self.engine.chat(conversations, sampling_params, use_tqdm=use_tqdm, **template_options)
        loras = loras_per_prompt(template_options.get("lora_request"), len(conversations))
        # vLLM's prompt of a chat is the rendered template, which its examples print
        tokenizer = self.engine.tokenizer
        return [self._request_output(None if tokenizer is None else tokenizer.decode(
                    r.get("prompt_token_ids") or []), r, lora) for r, lora in zip(results, loras)]

    def embed(self, prompts: Prompt | Sequence[Prompt], pooling_params: PoolingParams | None = None,
              use_tqdm: bool = True, truncate_prompt_tokens: int | None = None,
              lora_request: LoRARequest | Sequence[LoRARequest | None] | None = None) -> list[EmbeddingRequestOutput]:
        """vLLM's ``LLM.embed``: ``outputs.embedding`` a prompt (`Engine.embed`); ``truncate_prompt_tokens`` as
        `PoolingParams`' (one or the other)."""
        prompts = prompt_list(prompts)
        if truncate_prompt_tokens is not None:
            if pooling_params is not None and pooling_params.truncate_prompt_tokens is not None:
                raise ValueError("truncate_prompt_tokens: give it here or in pooling_params, not both")
            pooling_params = dataclasses.replace(pooling_params or PoolingParams(),
                                                 truncate_prompt_tokens=truncate_prompt_tokens)
        results = _pooled(self.engine.embed(prompts, pooling_params, use_tqdm=use_tqdm, lora_request=lora_request))
        return [EmbeddingRequestOutput(r["request_id"], self.engine.request_ids(p, pooling_params or PoolingParams()),
                                       EmbeddingOutput([float(x) for x in r["embedding"]]))
                for p, r in zip(prompts, results)]

    def encode(self, prompts: Prompt | Sequence[Prompt], pooling_params: PoolingParams | None = None,
               use_tqdm: bool = True, lora_request: LoRARequest | Sequence[LoRARequest | None] | None = None,
               pooling_task: str | None = None) -> list[PoolingRequestOutput]:
        """vLLM's ``LLM.encode``: each prompt's pooled output as ``outputs.data``, what the checkpoint pools (a causal
        LM's embedding, as `embed`; a classifier's label probabilities, as `classify`); ``pooling_task`` (vLLM's
        "embed" / "classify") must be that, where given.

        Example:
            >>> llm.encode(["import os"])[0].outputs.data.shape  # doctest: +SKIP
            (896,)
        """
        task = "classify" if self.engine.classify_head is not None else "embed"
        if pooling_task not in (None, task):
            raise ValueError(f"pooling_task: this checkpoint pools for {task!r}, got {pooling_task!r}")
        prompts = prompt_list(prompts)
        if task == "classify":
            results = self.engine.classify(prompts, pooling_params, use_tqdm=use_tqdm, lora_request=lora_request)
        else:
            results = self.engine.embed(prompts, pooling_params, use_tqdm=use_tqdm, lora_request=lora_request)
        results = _pooled(results)
        return [PoolingRequestOutput(r["request_id"], self.engine.request_ids(p, pooling_params or PoolingParams()),
                                     PoolingOutput(np.asarray(_pooled_data(r), np.float32)))
                for p, r in zip(prompts, results)]

    def classify(self, prompts: Prompt | Sequence[Prompt], pooling_params: PoolingParams | None = None,
                 use_tqdm: bool = True) -> list[ClassificationRequestOutput]:
        """vLLM's ``LLM.classify`` (a sequence classifier's checkpoint): ``outputs.probs`` a prompt (`Engine.classify`)."""
        prompts = prompt_list(prompts)
        results = _pooled(self.engine.classify(prompts, pooling_params, use_tqdm=use_tqdm))
        return [ClassificationRequestOutput(r["request_id"], self.engine.request_ids(p, PoolingParams()),
                                            ClassificationOutput([float(x) for x in r["probs"]]))
                for p, r in zip(prompts, results)]

    def score(self, text_1: Any, text_2: Any, use_tqdm: bool = True) -> list[ScoringRequestOutput]:
        """vLLM's ``LLM.score``: ``outputs.score`` a pair (`Engine.score`: cosine similarity of embeddings, or a
        one-label classifier's probability)."""
        results = self.engine.score(text_1, text_2, use_tqdm=use_tqdm)
        return [ScoringRequestOutput(f"score-{i}", ScoringOutput(r["score"])) for i, r in enumerate(results)]

    def beam_search(self, prompts: Prompt | Sequence[Prompt], params: Any,
                    use_tqdm: bool = True) -> list[BeamSearchOutput]:
        """vLLM's ``LLM.beam_search``: a `BeamSearchOutput` a prompt, its ``sequences`` best first
        (`Engine.beam_search`).

        Example:
            >>> out = llm.beam_search(["import os"], BeamSearchParams(beam_width=4, max_tokens=8))  # doctest: +SKIP
            >>> out[0].sequences[0].text  # doctest: +SKIP
        """
        results = self.engine.beam_search(prompt_list(prompts), params, use_tqdm=use_tqdm)
        tokenizer = self.engine.tokenizer
        outputs = []
        for result in results:
            beams = []
            for seq in result["sequences"]:
                tokens = result["prompt_token_ids"] + list(seq["token_ids"])
                beams.append(BeamSearchSequence(
                    tokens=tokens, logprobs=[{t: Logprob(lp, None, self._decode(t))}
                                             for t, lp in zip(seq["token_ids"], seq["logprobs"])],
                    cum_logprob=seq["cum_logprob"], text=None if tokenizer is None else tokenizer.decode(tokens),
                    finish_reason=seq["finish_reason"]))
            outputs.append(BeamSearchOutput(beams))
        return outputs

    @functools.cached_property
    def llm_engine(self) -> "LLMEngine":
        """vLLM's ``llm.llm_engine``: this LLM's engine stepped by hand (`LLMEngine`)."""
        return LLMEngine(self)

    def collective_rpc(self, method: str | Callable[..., Any], timeout: float | None = None,
                       args: tuple = (), kwargs: dict[str, Any] | None = None) -> list[Any]:
        """vLLM's: call ``method`` on every worker and return their answers, one a worker. jaxserve's one worker is
        the `Engine` (a process drives all its devices): a callable is called with it first, a name is its method
        (``"update_params"``, ``"stats"``, ...). ``timeout`` is vLLM's and checked only for its type.

        Example:
            >>> llm.collective_rpc(lambda engine: engine.stats()["pages_total"])  # doctest: +SKIP
            [1024]
        """
        if timeout is not None and not isinstance(timeout, (int, float)):
            raise TypeError(f"timeout must be a number of seconds or None, got {timeout!r}")
        if isinstance(method, str):
            call = getattr(self.engine, method, None)
            if call is None or method.startswith("_") or not callable(call):
                raise ValueError(f"method: the engine has no public method {method!r}")
            return [call(*args, **(kwargs or {}))]
        return [method(self.engine, *args, **(kwargs or {}))]

    def get_default_sampling_params(self) -> SamplingParams:
        """vLLM's: the sampling a prompt given none gets (the checkpoint's ``generation_config.json``;
        `Engine.default_sampling_params`)."""
        return self.engine.default_sampling_params()

    def reset_prefix_cache(self) -> bool:
        """vLLM's: forget every cached prefix (between benchmark runs; new weights do it themselves). True, as
        vLLM's answers when it could: the pages that running requests hold stay theirs until they finish."""
        self.engine.clear_prefix_cache()
        return True

    def update_params(self, params: Any, copy: bool = False) -> None:
        """New weights of the same shapes, compiling nothing again (`Engine.update_params`: a training loop's
        weight sync, what RL frameworks reach through vLLM's model executor; ``copy=True`` where the train step
        donates its params).

        Example:
            >>> llm.update_params(trainer_params)  # doctest: +SKIP
        """
        self.engine.update_params(params, copy=copy)

    def sleep(self, level: int = 1) -> None:
        self.engine.sleep(level)

    def get_metrics(self) -> list[Metric]:
        """vLLM's: the engine's gauges and what this LLM has answered, under vLLM's metric names (its example
        prints them by type: `Counter` / `Gauge`).

        Example:
            >>> {m.name: m.value for m in llm.get_metrics()}["vllm:num_requests_running"]  # doctest: +SKIP
            0
        """
        stats = self.engine.stats()
        counts = self._counts
        out: list[Metric] = [
            Gauge("vllm:num_requests_running", {}, float(stats["running"])),
            Gauge("vllm:num_requests_waiting", {}, float(stats["waiting"])),
            Gauge("vllm:kv_cache_usage_perc", {}, stats["pages_used"] / max(stats["pages_total"], 1)),
            Counter("vllm:num_preemptions", {}, int(stats["preemptions"])),
            Counter("vllm:prompt_tokens", {}, counts["prompt"]),
            Counter("vllm:generation_tokens", {}, counts["generation"])]
        out += [Counter("vllm:request_success", {"finished_reason": reason}, n)
                for reason, n in sorted(counts["finished"].items())]
        return out

    def start_profile(self, trace_dir: str | os.PathLike | None = None) -> None:
        """vLLM's: start a profile of everything the engine runs until `stop_profile`, as JAX's profiler trace
        (TensorBoard / Perfetto: device kernels, host work) in ``trace_dir``, else ``$JAXSERVE_PROFILE_DIR``, else
        vLLM's ``$VLLM_TORCH_PROFILER_DIR``, else ``./jaxserve_profile``.

        Example:
            >>> llm.start_profile(); llm.generate(prompts); llm.stop_profile()  # doctest: +SKIP
        """
        import jax

        trace_dir = trace_dir or os.environ.get("JAXSERVE_PROFILE_DIR") or os.environ.get(
            "VLLM_TORCH_PROFILER_DIR") or "jaxserve_profile"
        jax.profiler.start_trace(os.fspath(trace_dir))

    def stop_profile(self) -> None:
        """vLLM's: end the profile `start_profile` began and write it out."""
        import jax

        jax.profiler.stop_trace()

    def wake_up(self, tags: Sequence[str] | None = None, params: Any = None) -> None:
        """vLLM's: the engine back from `sleep`. ``tags`` (vLLM's "weights" / "kv_cache", to wake one part first):
        checked and taken as a whole wake-up, since jaxserve wakes both in one call; after ``sleep(level=2)`` the
        weights come as ``params``."""
        if tags is not None and not (isinstance(tags, (list, tuple)) and all(isinstance(t, str) for t in tags)):
            tags, params = None, tags  # jaxserve's wake_up(params), before vLLM's tags came first
        if tags is not None and not set(tags) <= {"weights", "kv_cache"}:
            raise ValueError(f"tags must be a list of 'weights' / 'kv_cache', got {tags!r}")
        self.engine.wake_up(params)

    def _count(self, prompt_ids: list[int] | None, outputs: list[CompletionOutput]) -> None:
        """`get_metrics`' counts: a prompt answered (counted once, with its first sample) and its finished samples."""
        counts = self._counts
        counts["prompt"] += len(prompt_ids or ())
        for out in outputs:
            counts["generation"] += len(out.token_ids)
            counts["finished"][out.finish_reason] = counts["finished"].get(out.finish_reason, 0) + 1

    def _request_output(self, prompt: Prompt | None, result: dict[str, Any],
                        lora: LoRARequest | None = None) -> RequestOutput:
        samples = result.get("outputs", [result])
        decode = self._decode
        first = samples[0]
        prompt_ids = first.get("prompt_token_ids")
        text, shown_ids = _shown_prompt(prompt, prompt_ids)
        outputs = [_completion_output(i, s, decode) for i, s in enumerate(samples)]
        self._count(prompt_ids, outputs)
        for out in outputs:
            out.lora_request = lora
        return RequestOutput(
            request_id=first["request_id"], prompt=text, prompt_token_ids=shown_ids,
            prompt_logprobs=_prompt_logprobs(first, prompt_ids, decode), outputs=outputs,
            num_cached_tokens=first["cached_tokens"], lora_request=lora)


class EngineArgs:
    """vLLM's ``EngineArgs`` as `LLMEngine.from_engine_args` takes them: the checkpoint and vLLM's engine arguments
    (`LLM`'s).

    Example:
        >>> engine = LLMEngine.from_engine_args(EngineArgs(max_model_len=1024))  # doctest: +SKIP
    """

    def __init__(self, model: str | os.PathLike | Any | None = None, **engine_args: Any) -> None:
        self.model = model
        self.engine_args = engine_args


@dataclasses.dataclass
class _Parent:
    """One `LLMEngine` request: its ``n`` samples' engine requests and what has gone out of each."""

    prompt: Prompt
    params: SamplingParams | PoolingParams
    lora: LoRARequest | None
    children: list[str]  # engine request ids, by sample index
    texts: list[str]  # each sample's text sent so far (a stop string's possible start held back)
    tokens: list[int]  # each sample's tokens sent so far
    finals: dict[int, CompletionOutput] = dataclasses.field(default_factory=dict)  # samples ended


class LLMEngine:
    """vLLM's ``LLMEngine``, for scripts that step the engine themselves: `add_request`, `step`,
    `has_unfinished_requests`, `abort_request` over an `LLM`'s `Engine`, each step's news as vLLM's `RequestOutput`
    (a pooling request's `PoolingRequestOutput` when it ends). What a step returns follows the request's
    ``SamplingParams.output_kind``, as vLLM's: CUMULATIVE (the default) the text and tokens so far, DELTA those new
    since the last output, FINAL_ONLY nothing until the request ends. A prompt's ``n`` samples run as n engine
    requests; as vLLM's, a streamed output holds the sample that moved (its ``index``), a FINAL_ONLY one all n once
    the last ends; ``finished`` is True once every sample has.

    Example:
        >>> engine = LLMEngine.from_engine_args(EngineArgs(max_model_len=1024))                # doctest: +SKIP
        >>> engine.add_request("0", "def add(a, b):", SamplingParams(max_tokens=8))          # doctest: +SKIP
        >>> while engine.has_unfinished_requests():                                         # doctest: +SKIP
        ...     for out in engine.step():
        ...         if out.finished:
        ...             print(out.outputs[0].text)
    """

    def __init__(self, llm: LLM) -> None:
        self.llm = llm
        self.engine = llm.engine
        self._parents: dict[str, _Parent] = {}
        self._child: dict[str, tuple[str, int]] = {}  # engine request id -> (its parent's id, its sample index)

    @classmethod
    def from_engine_args(cls, engine_args: EngineArgs) -> "LLMEngine":
        return LLM(engine_args.model, **engine_args.engine_args).llm_engine

    def get_tokenizer(self) -> Any:
        return self.engine.tokenizer

    def add_request(self, request_id: str, prompt: Prompt, params: SamplingParams | PoolingParams | None = None,
                    arrival_time: float | None = None, lora_request: LoRARequest | None = None,
                    tokenization_kwargs: dict[str, Any] | None = None, trace_headers: Any = None,
                    priority: int = 0) -> None:
        """Queue a prompt (text, token ids, or vLLM's prompt dicts) as ``request_id``; ``params`` None is the
        checkpoint's default sampling. A bad request raises ``ValueError`` and queues nothing. ``arrival_time``,
        ``tokenization_kwargs`` and ``trace_headers`` (vLLM's) change nothing here."""
        if self.engine.closed:
            raise RuntimeError("engine is closed")
        if not isinstance(request_id, str) or not request_id:
            raise ValueError(f"request_id must be a non-empty string, got {request_id!r}")
        if request_id in self._parents:
            raise ValueError(f"request_id {request_id!r} is already in use")
        params = params if params is not None else self.engine.default_sampling_params()
        samples = sample_requests(params)
        ids = [request_id] if len(samples) == 1 else [f"{j}_{request_id}" for j in range(len(samples))]
        # Every sample checked before any is queued, so a refusal leaves nothing behind.
        made = [self.engine.make_request(prompt, p, rid, priority, lora_request) for p, rid in zip(samples, ids)]
        for j, request in enumerate(made):
            self.engine._queue(request)
            self._child[request.request_id] = (request_id, j)
        self._parents[request_id] = _Parent(prompt, params, lora_request, [r.request_id for r in made],
                                            [""] * len(made), [0] * len(made))

    def abort_request(self, request_id: str | Sequence[str]) -> None:
        """End requests now, their pages freed; no output follows (vLLM's). Unknown or ended ids are skipped."""
        for rid in [request_id] if isinstance(request_id, str) else request_id:
            parent = self._parents.pop(rid, None)
            for j, child in enumerate(parent.children if parent is not None else ()):
                if self._child.get(child) != (rid, j):
                    # This sample ended and was released: its engine id ("0_x") may since name another request,
                    # which aborting here would end unreported, its own entry left unfinished for good.
                    continue
                self.engine.abort(child)
                self.engine.release(child)
                self._child.pop(child, None)

    def has_unfinished_requests(self) -> bool:
        return bool(self._parents)

    def get_num_unfinished_requests(self) -> int:
        return len(self._parents)

    def step(self) -> list[RequestOutput | PoolingRequestOutput]:
        """One engine step; the outputs it made, in the order the engine reports its requests."""
        moved = [r.request_id for r in self.engine.step() if r.request_id in self._child]
        # A request may also have ended in steps something else ran (an `LLM.generate` in between): not lost.
        seen = set(moved)
        moved += [c for c in self._child if c not in seen and self.engine.requests[c].finish_reason is not None]
        outputs = []
        for child in moved:
            out = self._output(child)
            if out is not None:
                outputs.append(out)
        return outputs

    def _output(self, child: str) -> RequestOutput | PoolingRequestOutput | None:
        parent_id, j = self._child[child]
        parent = self._parents[parent_id]
        request = self.engine.requests[child]
        ended = request.finish_reason is not None
        if ended:
            self.engine.release(child)
            del self._child[child]
        if isinstance(parent.params, PoolingParams):
            if not ended:  # a chunk of a long prompt: the embedding comes with the last
                return None
            del self._parents[parent_id]
            data = _pooled_data(request.result())
            # None where it ended unpooled (`result`'s "error" says why; the engine's request keeps it)
            return PoolingRequestOutput(parent_id, list(request.prompt_ids),
                                        PoolingOutput(None if data is None else np.asarray(data, np.float32)))
        delta, _ = request.take_delta()
        parent.texts[j] += delta
        result = request.result()
        sample = _completion_output(j, {**result, "text": parent.texts[j]}, self.llm._decode)
        sample.lora_request = parent.lora
        kind = parent.params.output_kind
        sent, parent.tokens[j] = parent.tokens[j], len(sample.token_ids)
        if ended:
            parent.finals[j] = sample
            self.llm._count(result["prompt_token_ids"] if j == 0 else None, [sample])
        finished = len(parent.finals) == len(parent.children)
        if finished:
            del self._parents[parent_id]
        if kind == RequestOutputKind.FINAL_ONLY:
            if not finished:
                return None
            samples = [parent.finals[i] for i in range(len(parent.children))]
        else:
            if kind == RequestOutputKind.DELTA:
                if not delta and len(sample.token_ids) == sent and not ended:
                    return None
                sample.text, sample.token_ids = delta, sample.token_ids[sent:]
                sample.logprobs = None if sample.logprobs is None else sample.logprobs[sent:]
            samples = [sample]
        text, prompt_ids = _shown_prompt(parent.prompt, result["prompt_token_ids"])
        # vLLM's DELTA outputs carry the prompt's log-probabilities once, with a sample's first tokens.
        scored = kind != RequestOutputKind.DELTA or sent == 0
        return RequestOutput(
            request_id=parent_id, prompt=text, prompt_token_ids=prompt_ids,
            prompt_logprobs=_prompt_logprobs(result, prompt_ids, self.llm._decode) if scored else None,
            outputs=samples, finished=finished, num_cached_tokens=result["cached_tokens"], lora_request=parent.lora)


def _pooled(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """``results`` of `Engine.embed` / `classify`, or a ValueError naming the first prompt that was not pooled (a
    prompt the KV pool can never hold): vLLM's pooling outputs have no place for an abort."""
    for i, r in enumerate(results):
        if _pooled_data(r) is None:
            raise ValueError(f"prompt {i} was not pooled ({r['finish_reason']}): {r.get('error') or 'no reason given'}")
    return results


def _pooled_data(result: dict[str, Any]) -> Any:
    """A pooling result's output: a classifier's label probabilities, else the embedding (None where unpooled)."""
    return result["probs"] if "probs" in result else result["embedding"]


def _shown_prompt(prompt: Prompt | None, prompt_ids: list[int] | None) -> tuple[str | None, list[int] | None]:
    """A `RequestOutput`'s prompt text (where given as text) and token ids as vLLM's show them: None for a prompt given
    as embeddings, whose ids are placeholders (0)."""
    text = prompt if isinstance(prompt, str) else prompt.get("prompt") if isinstance(prompt, dict) else None
    embedded = isinstance(prompt, Mapping) and "prompt_embeds" in prompt
    return text, None if embedded else prompt_ids or []


def _completion_output(index: int, result: dict[str, Any], decode: Any) -> CompletionOutput:
    chosen = result.get("logprobs")
    logprobs = None
    if chosen is not None:
        tops = result.get("top_logprobs") or [{} for _ in chosen]
        ranks = result.get("logprob_ranks") or [None] * len(chosen)
        named = result.get("top_logprob_ranks") or [None] * len(chosen)
        logprobs = []
        for token, lp, top, rank, named_ranks in zip(result["token_ids"], chosen, tops, ranks, named):
            # vLLM's dict: the sampled token first (scripts read it as the dict's first entry), with its rank, then
            # the top ones best first, each ranked by its place (the sampled one's too, where it is among them);
            # logprob_token_ids in the order asked, each at its rank among the vocabulary.
            if named_ranks is not None:
                ranked = {t: Logprob(v, named_ranks[t], decode(t)) for t, v in top.items()}
            else:
                ranked = {t: Logprob(v, k + 1, decode(t)) for k, (t, v) in enumerate(best_first(top))}
            logprobs.append({token: ranked.get(token) or Logprob(lp, rank, decode(token)), **ranked})
    return CompletionOutput(index=index, text=result["text"], token_ids=list(result["token_ids"]),
                            cumulative_logprob=None if chosen is None else float(sum(chosen)),
                            logprobs=logprobs, finish_reason=result["finish_reason"],
                            stop_reason=result.get("stop_reason"))


def _prompt_logprobs(result: dict[str, Any], prompt_ids: list[int] | None,
                     decode: Any) -> list[dict[int, Logprob] | None] | None:
    scored = result.get("prompt_logprobs")
    if scored is None or prompt_ids is None:
        return None
    ranks = result.get("prompt_logprob_ranks") or [None] * len(scored)
    out: list[dict[int, Logprob] | None] = []
    for token, entry, rank in zip(prompt_ids, scored, ranks):
        if entry is None:
            out.append(None)
            continue
        # vLLM's order: the prompt token first (at its own rank), then the top ones best first.
        ranked = {t: Logprob(v, rank if t == token else k + 1, decode(t))
                  for k, (t, v) in enumerate(best_first(entry))}
        out.append({token: ranked[token], **ranked})
    return out
