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
from typing import Any, Sequence

from jaxserve.engine import Engine, Prompt, prompt_list
from jaxserve.engine_config import EngineConfig
from jaxserve.lora import LoRARequest
from jaxserve.pooling import PoolingParams
from jaxserve.request import best_first
from jaxserve.sampling import SamplingParams

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
_NO_OPS = ("trust_remote_code", "enforce_eager", "disable_log_stats", "swap_space", "tokenizer_mode",
           "disable_custom_all_reduce", "disable_async_output_proc", "compilation_config", "load_format",
           "distributed_executor_backend", "max_seq_len_to_capture", "download_dir", "max_cpu_loras")
# vLLM's arguments taken at the value that is what jaxserve does (any other is a TypeError naming it). Adapters are
# held in the model's dtype ("auto"), their products unsharded past tensor parallelism's column split.
_ONLY = {"pipeline_parallel_size": (1,), "cpu_offload_gb": (0,), "lora_dtype": ("auto", None),
         "fully_sharded_loras": (False,)}


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

    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclasses.dataclass
class RequestOutput:
    """vLLM's: a prompt and its samples (``n`` of them)."""

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    prompt_logprobs: list[dict[int, Logprob] | None] | None
    outputs: list[CompletionOutput]
    finished: bool = True
    num_cached_tokens: int = 0


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
        self.engine = Engine(model, engine_config or engine_config_from_vllm(**engine_args))
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
        return [self._request_output(p, r) for p, r in zip(prompts, results)]

    def chat(self, messages: Any, sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
             use_tqdm: bool = True, **template_options: Any) -> list[RequestOutput]:
        """vLLM's ``LLM.chat``: one conversation or a list of them (`Engine.chat`'s template options:
        ``chat_template``, ``add_generation_prompt``, ``continue_final_message``, ``tools``, ``chat_template_kwargs``,
        ``lora_request``)."""
        conversations = [messages] if messages and isinstance(messages[0], dict) else list(messages)
        results = self.engine.chat(conversations, sampling_params, use_tqdm=use_tqdm, **template_options)
        return [self._request_output(None, r) for r in results]

    def embed(self, prompts: Prompt | Sequence[Prompt], pooling_params: PoolingParams | None = None,
              use_tqdm: bool = True) -> list[EmbeddingRequestOutput]:
        """vLLM's ``LLM.embed``: ``outputs.embedding`` a prompt (`Engine.embed`)."""
        prompts = prompt_list(prompts)
        results = self.engine.embed(prompts, pooling_params, use_tqdm=use_tqdm)
        return [EmbeddingRequestOutput(r["request_id"], self.engine.request_ids(p, pooling_params or PoolingParams()),
                                       EmbeddingOutput([float(x) for x in r["embedding"]]))
                for p, r in zip(prompts, results)]

    def classify(self, prompts: Prompt | Sequence[Prompt], pooling_params: PoolingParams | None = None,
                 use_tqdm: bool = True) -> list[ClassificationRequestOutput]:
        """vLLM's ``LLM.classify`` (a sequence classifier's checkpoint): ``outputs.probs`` a prompt (`Engine.classify`)."""
        prompts = prompt_list(prompts)
        results = self.engine.classify(prompts, pooling_params, use_tqdm=use_tqdm)
        return [ClassificationRequestOutput(r["request_id"], self.engine.request_ids(p, PoolingParams()),
                                            ClassificationOutput([float(x) for x in r["probs"]]))
                for p, r in zip(prompts, results)]

    def score(self, text_1: Any, text_2: Any, use_tqdm: bool = True) -> list[ScoringRequestOutput]:
        """vLLM's ``LLM.score``: ``outputs.score`` a pair (`Engine.score`: cosine similarity of embeddings, or a
        one-label classifier's probability)."""
        results = self.engine.score(text_1, text_2, use_tqdm=use_tqdm)
        return [ScoringRequestOutput(f"score-{i}", ScoringOutput(r["score"])) for i, r in enumerate(results)]

    def beam_search(self, prompts: Prompt | Sequence[Prompt], params: Any, use_tqdm: bool = True) -> list[dict]:
        """`Engine.beam_search` (each prompt's ``sequences``, best first)."""
        return self.engine.beam_search(prompt_list(prompts), params, use_tqdm=use_tqdm)

    def get_default_sampling_params(self) -> SamplingParams:
        """vLLM's: the sampling a prompt given none gets (the checkpoint's ``generation_config.json``;
        `Engine.default_sampling_params`)."""
        return self.engine.default_sampling_params()

    def reset_prefix_cache(self) -> bool:
        """vLLM's: forget every cached prefix (between benchmark runs; new weights do it themselves). True, as
        vLLM's answers when it could: the pages that running requests hold stay theirs until they finish."""
        self.engine.clear_prefix_cache()
        return True

    def update_params(self, params: Any) -> None:
        """New weights of the same shapes, compiling nothing again (`Engine.update_params`: a training loop's
        weight sync, what RL frameworks reach through vLLM's model executor).

        Example:
            >>> llm.update_params(trainer_params)  # doctest: +SKIP
        """
        self.engine.update_params(params)

    def sleep(self, level: int = 1) -> None:
        self.engine.sleep(level)

    def wake_up(self, params: Any = None) -> None:
        self.engine.wake_up(params)

    def _request_output(self, prompt: Prompt | None, result: dict[str, Any]) -> RequestOutput:
        samples = result.get("outputs", [result])
        decode = self._decode
        first = samples[0]
        prompt_ids = first.get("prompt_token_ids")
        text = prompt if isinstance(prompt, str) else prompt.get("prompt") if isinstance(prompt, dict) else None
        return RequestOutput(
            request_id=first["request_id"], prompt=text, prompt_token_ids=prompt_ids or [],
            prompt_logprobs=_prompt_logprobs(first, prompt_ids, decode),
            outputs=[_completion_output(i, s, decode) for i, s in enumerate(samples)],
            num_cached_tokens=first["cached_tokens"])


def _completion_output(index: int, result: dict[str, Any], decode: Any) -> CompletionOutput:
    chosen = result.get("logprobs")
    logprobs = None
    if chosen is not None:
        tops = result.get("top_logprobs") or [{} for _ in chosen]
        ranks = result.get("logprob_ranks") or [None] * len(chosen)
        logprobs = []
        for token, lp, top, rank in zip(result["token_ids"], chosen, tops, ranks):
            # vLLM's dict: a top token's rank is its place in the list (the sampled one's too, where it is there).
            entry = {t: Logprob(v, k + 1, decode(t)) for k, (t, v) in enumerate(best_first(top))}
            if token not in entry:  # vLLM always returns the sampled token's own, with its rank
                entry[token] = Logprob(lp, rank, decode(token))
            logprobs.append(entry)
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
        out.append({t: Logprob(v, rank if t == token else k + 1, decode(t))
                    for k, (t, v) in enumerate(best_first(entry))})
    return out
