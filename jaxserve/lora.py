"""LoRA adapters served beside the base model (vLLM's ``LoRARequest`` and ``--max-loras``).

A request names an adapter (a PEFT folder: ``adapter_config.json`` + ``adapter_model.safetensors``); the engine
keeps up to ``EngineConfig.max_loras`` adapters on the device at once, in slots, and a batch mixes rows of any of
them with base-model rows. Each projection's adapters are stacked a layer, ``a [slots, R, in]`` and
``b [slots, R, out]`` (the scale ``lora_alpha / r`` folded into ``b``); the fused projections (q/k/v,
gate/up) hold their parts' ranks side by side, ``R = parts x max_lora_rank``. A step adds, for row i,
``((x @ a[slot_i].T) @ b[slot_i])``: one product over every slot's columns, masked to the row's own (`lora_delta`),
so a batch of several adapters is two dense products a projection, not a gather of weights a row.

Decode steps with adapter rows fold each term into its projection's Mosaic GPU kernel (`jaxserve.model.LORA_FOLD`,
on the accumulating glue: `LORA_GLUE`), reading the stacks in the forms `LoraSlots(folded=True)` keeps
(`fold_columns`); other passes add ``lora_delta`` after the product. A batch without adapters keeps every fast path.
A request holds its adapter's slot from admission until it finishes or is preempted; a waiting request whose adapter
has no slot (all held by running requests) waits while others are admitted (`jaxserve.scheduler`). The prefix cache
keeps each adapter's prefixes apart: K/V depend on the adapter.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxserve.config import ModelConfig

# Each fused projection's parts in the order its output columns hold them (`jaxserve.model`: q, k, v; gate, up).
PROJECTION_PARTS = {
    "qkv_proj": ("self_attn", ("q_proj", "k_proj", "v_proj")),
    "o_proj": ("self_attn", ("o_proj",)),
    "gate_up_proj": ("mlp", ("gate_proj", "up_proj")),
    "down_proj": ("mlp", ("down_proj",)),
}
TARGETS = tuple(p for _, parts in PROJECTION_PARTS.values() for p in parts)
PART_GROUPS = {part: group for group, parts in PROJECTION_PARTS.values() for part in parts}  # q_proj: self_attn


def peft_prefix(layer: int, part: str) -> str:
    """The name PEFT gives a Qwen2 layer's LoRA part in ``adapter_model.safetensors`` (``.lora_A.weight`` and
    ``.lora_B.weight`` follow it).

    Example:
        >>> peft_prefix(3, "q_proj")
        'base_model.model.model.layers.3.self_attn.q_proj'
    """
    return f"base_model.model.model.layers.{layer}.{PART_GROUPS[part]}.{part}"


@dataclasses.dataclass(frozen=True)
class LoRARequest:
    """vLLM's ``LoRARequest``: an adapter's name, a positive int id unique to it, and its PEFT folder.

    Example:
        >>> LoRARequest("sql", 1, "/adapters/sql-lora").lora_int_id
        1
    """

    lora_name: str
    lora_int_id: int
    lora_path: str = ""
    # vLLM's older name of lora_path (its scripts still pass it), moved there, then None.
    lora_local_path: str | None = dataclasses.field(default=None, compare=False)
    # vLLM's note of the model an adapter was trained on; jaxserve checks the adapter's shapes against its model.
    base_model_name: str | None = None

    def __post_init__(self) -> None:
        if self.lora_local_path is not None:
            if not self.lora_path:  # vLLM's rule: lora_path first where both are given
                object.__setattr__(self, "lora_path", self.lora_local_path)
            object.__setattr__(self, "lora_local_path", None)
        if not self.lora_path:
            raise ValueError("lora_path must name the adapter's folder")
        if not isinstance(self.lora_name, str) or not self.lora_name:
            raise ValueError(f"lora_name must be a non-empty string, got {self.lora_name!r}")
        if not isinstance(self.lora_int_id, (int, np.integer)) or isinstance(self.lora_int_id, bool) \
                or self.lora_int_id < 1:
            raise ValueError(f"lora_int_id must be an int >= 1, got {self.lora_int_id!r}")
        if not isinstance(self.lora_path, (str, os.PathLike)):
            raise ValueError(f"lora_path must be a path, got {self.lora_path!r}")
        object.__setattr__(self, "lora_int_id", int(self.lora_int_id))
        object.__setattr__(self, "lora_path", os.fspath(self.lora_path))


def _target_modules(cfg: dict[str, Any]) -> set[str]:
    targets = cfg.get("target_modules")
    if targets == "all-linear":  # PEFT's shorthand: every linear layer but the output head
        return set(TARGETS)
    if isinstance(targets, str):  # PEFT's regex form, matched against the base model's module names
        return {t for t in TARGETS if re.fullmatch(targets, f"model.layers.0.{PART_GROUPS[t]}.{t}")}
    if not isinstance(targets, (list, tuple)) or not targets:
        raise ValueError(f"adapter_config.json: target_modules must be a list of module names, got {targets!r}")
    unknown = sorted(set(targets) - set(TARGETS))
    if unknown:
        raise ValueError(f"adapter_config.json: target_modules {unknown} are not supported (only {list(TARGETS)})")
    return set(targets)


def _in_out(config: ModelConfig) -> dict[str, tuple[int, int]]:
    h, kvh, d = config.num_attention_heads, config.num_key_value_heads, config.head_dim
    return {"q_proj": (config.hidden_size, h * d), "k_proj": (config.hidden_size, kvh * d),
            "v_proj": (config.hidden_size, kvh * d), "o_proj": (h * d, config.hidden_size),
            "gate_proj": (config.hidden_size, config.intermediate_size),
            "up_proj": (config.hidden_size, config.intermediate_size),
            "down_proj": (config.intermediate_size, config.hidden_size)}


def stack_shapes(config: ModelConfig, max_rank: int) -> dict[str, tuple[int, int, int]]:
    """Each projection's ``(R, in, out)``: its parts' ranks side by side, its input and (fused) output width."""
    in_out = _in_out(config)
    return {proj: (len(parts) * max_rank, in_out[parts[0]][0], sum(in_out[p][1] for p in parts))
            for proj, (_, parts) in PROJECTION_PARTS.items()}


def load_adapter(path: str, config: ModelConfig, max_rank: int) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """A PEFT LoRA folder as this engine's per-projection arrays (float32, host): ``{projection: (a [layers, R, in],
    b [layers, R, out])}``, ``R = parts x max_rank``, the scale folded into ``b``. ValueError naming what is wrong
    (no folder, not LoRA, a rank past ``max_rank``, modules or options this engine does not run).

    Example:
        >>> w = load_adapter("/adapters/sql-lora", model.config, max_rank=16)  # doctest: +SKIP
        >>> w["qkv_proj"][0].shape  # doctest: +SKIP
        (24, 48, 896)
    """
    from safetensors.numpy import load_file

    cfg_path = os.path.join(path, "adapter_config.json")
    if not os.path.isfile(cfg_path):
        raise ValueError(f"lora_path {path!r} has no adapter_config.json")
    with open(cfg_path) as f:
        cfg = json.load(f)
    if cfg.get("peft_type", "LORA") != "LORA":
        raise ValueError(f"adapter_config.json: peft_type must be LORA, got {cfg.get('peft_type')!r}")
    r = cfg.get("r")
    if not isinstance(r, int) or not 1 <= r <= max_rank:
        raise ValueError(f"adapter rank r must be an int in [1, max_lora_rank={max_rank}], got {r!r}")
    for key, ok in (("fan_in_fan_out", False), ("use_dora", False)):
        if bool(cfg.get(key, ok)) != ok:
            raise ValueError(f"adapter_config.json: {key}={cfg[key]!r} is not supported")
    if cfg.get("bias", "none") != "none":
        raise ValueError(f"adapter_config.json: bias={cfg['bias']!r} is not supported (only 'none')")
    for key in ("modules_to_save", "layers_to_transform", "rank_pattern", "alpha_pattern"):
        if cfg.get(key):
            raise ValueError(f"adapter_config.json: {key} is not supported, got {cfg[key]!r}")
    alpha = cfg.get("lora_alpha", r)
    scale = alpha / math.sqrt(r) if cfg.get("use_rslora") else alpha / r
    targets = _target_modules(cfg)
    weights_path = os.path.join(path, "adapter_model.safetensors")
    if not os.path.isfile(weights_path):
        raise ValueError(f"lora_path {path!r} has no adapter_model.safetensors")
    tensors = {re.sub(r"\.default(?=\.weight$)", "", k): v for k, v in load_file(weights_path).items()}
    in_out = _in_out(config)
    layers = config.num_hidden_layers
    used: set[str] = set()
    out = {}
    for proj, (_, parts) in PROJECTION_PARTS.items():
        fan_in = in_out[parts[0]][0]
        outs = [in_out[p][1] for p in parts]
        a = np.zeros((layers, len(parts) * max_rank, fan_in), np.float32)
        b = np.zeros((layers, len(parts) * max_rank, sum(outs)), np.float32)
        for j, part in enumerate(parts):
            if part not in targets:
                continue
            col = sum(outs[:j])
            for i in range(layers):
                prefix = peft_prefix(i, part)
                ka, kb = f"{prefix}.lora_A.weight", f"{prefix}.lora_B.weight"
                if ka not in tensors or kb not in tensors:
                    raise ValueError(f"adapter_model.safetensors has no {ka} / {kb}")
                wa, wb = tensors[ka], tensors[kb]
                if wa.shape != (r, fan_in) or wb.shape != (outs[j], r):
                    raise ValueError(f"{prefix}: lora_A {wa.shape} / lora_B {wb.shape}, expected "
                                     f"{(r, fan_in)} / {(outs[j], r)}")
                a[i, j * max_rank: j * max_rank + r] = wa
                b[i, j * max_rank: j * max_rank + r, col: col + outs[j]] = wb.T * scale
                used.update((ka, kb))
        out[proj] = (a, b)
    unread = sorted(k for k in tensors if k not in used)
    if unread:
        raise ValueError(f"adapter_model.safetensors holds weights this engine does not apply: {unread[:4]}")
    return out


def lora_delta(x: jax.Array, a: jax.Array, b: jax.Array, slots: jax.Array, out_dtype: Any = None) -> jax.Array:
    """Row i's LoRA term ``(x_i @ a[slots_i].T) @ b[slots_i]`` for ``x [B, S, in]``, ``a [n, R, in]``, ``b [n, R, out]``
    and ``slots [B]`` (-1: no adapter, zeros): one product over all n slots' R columns, the other rows' masked out.
    In ``out_dtype`` (default ``x``'s): float32 where it is added into a float32 accumulator.

    Example:
        >>> a, b = jnp.ones((2, 1, 3)), jnp.stack([jnp.ones((1, 2)), 2 * jnp.ones((1, 2))])
        >>> lora_delta(jnp.ones((3, 1, 3)), a, b, jnp.array([0, 1, -1]))[:, 0]
        Array([[3., 3.],
               [6., 6.],
               [0., 0.]], dtype=float32)
    """
    n, r, _ = a.shape
    t = jnp.einsum("bsi,ni->bsn", x, a.reshape(n * r, -1).astype(x.dtype), preferred_element_type=jnp.float32)
    mine = (jnp.arange(n * r) // r)[None, :] == slots[:, None]
    t = jnp.where(mine[:, None, :], t, 0.0).astype(x.dtype)
    # The expand's product written in the output dtype itself (float32 sums rounded once, as a float32 product
    # converted would be): a bf16 term converted from a float32 product took a convert launch of its own on the GPU
    # (`wrapped_convert`, between the expand's GEMM and the projection's, which adds the term as its addend): ~10 µs
    # a prefill projection, 163 µs of GPU time a generated token at 256 adapter rows (bench/results/lora.md s64).
    return jnp.einsum("bsn,no->bso", t, b.reshape(n * r, -1).astype(x.dtype),
                      preferred_element_type=jnp.dtype(out_dtype or x.dtype))


# Adapters an engine can keep apart in its prefix index: `Request.index_ids` moves an adapter's first token to
# -1 - token - namespace * NAMESPACE_STRIDE, which must stay an int32 (and tokens must stay below the stride).
NAMESPACE_STRIDE = 1 << 18
MAX_NAMESPACES = (1 << 31) // NAMESPACE_STRIDE - 1


class LoraSlots:
    """The adapters on the device: ``max_loras`` slots of stacked weights (`load_adapter`'s arrays in the model's
    dtype), which requests hold while admitted, and each adapter's host copy (read once).

    `acquire` gives a request's adapter a slot (loading it into a free one, or into the least recently used that no
    request holds), `release` drops the hold. ``weights`` is what a step passes to the model.

    Example:
        >>> slots = LoraSlots(model.config, max_loras=4, max_rank=16, dtype=jnp.bfloat16)  # doctest: +SKIP
        >>> namespace = slots.register(LoRARequest("sql", 1, "/adapters/sql"))  # doctest: +SKIP
        >>> slots.acquire(namespace)  # doctest: +SKIP
        0
    """

    def __init__(self, config: ModelConfig, max_loras: int, max_rank: int, dtype: Any,
                 device: jax.Device | None = None, tensor_parallel: Any = None, folded: bool = False) -> None:
        self.config, self.max_loras, self.max_rank, self.dtype = config, max_loras, max_rank, dtype
        self.device = device
        # A `jaxserve.tensor_parallel.TensorParallel` whose model the adapters join: their stacks split as its weights.
        self.tp = tensor_parallel
        # Host copies, slots and residents are keyed by namespace, one a registration, not by adapter id: an id
        # forgotten and registered again with another folder is another adapter, and requests made before keep theirs.
        self.host: dict[int, dict[str, tuple[np.ndarray, np.ndarray]]] = {}
        self.requests: dict[int, LoRARequest] = {}
        self.namespace: dict[int, int] = {}  # adapter id -> small int keeping its prefixes apart in the index
        self._namespaces = 0  # given out so far: a forgotten adapter's is never given again
        self.retired: set[int] = set()  # namespaces of forgotten adapters whose host copies requests may still need
        self.slot_of: dict[int, int] = {}
        self.held = [0] * max_loras
        self.resident: list[int | None] = [None] * max_loras
        self._clock = 0
        self.last_use = [0] * max_loras
        # Zeros until adapters load: what warm-up traces the adapter variants with, and an empty slot's terms. A
        # layer's stack is an array of its own, not a slice of one [layers, ...] array: XLA copies out each slice
        # that feeds a cuBLAS product (H100, session 56: 7 memcpy launches a layer, ~270 µs of a 2.2 ms step).
        def zeros(*shape: int) -> tuple[jax.Array, ...]:
            return tuple(jnp.zeros(shape, dtype, device=device) for _ in range(config.num_hidden_layers))

        self.weights: dict[str, tuple[tuple[jax.Array, ...], tuple[jax.Array, ...]]] = {
            p: (zeros(max_loras, r, fan_in), zeros(max_loras, r, fan_out))
            for p, (r, fan_in, fan_out) in stack_shapes(config, max_rank).items()}
        if tensor_parallel is not None:
            self.weights = tensor_parallel.shard_lora(self.weights, config)
        # ``folded``: each projection's stacks also as the Mosaic GPU projections' folded terms read them
        # (`fold_columns`: ``a`` as ``[T, in]``, ``b`` as ``[out, T]``, a layer; `jaxserve.model.LORA_FOLD`), written
        # with each slot so that no step reshapes, pads or transposes them. Not under tensor parallelism (no fold there).
        self.folded: dict[str, tuple[tuple[jax.Array, ...], tuple[jax.Array, ...]]] | None = None
        if folded and tensor_parallel is None:
            self.folded = {p: (zeros(fold_width(max_loras * r), fan_in), zeros(fan_out, fold_width(max_loras * r)))
                           for p, (r, fan_in, fan_out) in stack_shapes(config, max_rank).items()}
        self._write = jax.jit(_write_slot, donate_argnums=(0, 1))

    def register(self, request: LoRARequest) -> int:
        """Read and check a request's adapter (once per id); returns its prefix-cache namespace (1, 2, ...)."""
        known = self.requests.get(request.lora_int_id)
        if known is not None:
            if known.lora_path != request.lora_path:
                raise ValueError(f"lora_int_id {request.lora_int_id} is already {known.lora_path!r}, "
                                 f"not {request.lora_path!r}")
            return self.namespace[request.lora_int_id]
        if self._namespaces + 1 >= MAX_NAMESPACES:
            raise ValueError(f"this engine has seen {self._namespaces} adapters, the most it can keep apart "
                             f"in its prefix cache; start a new engine")
        adapter = load_adapter(request.lora_path, self.config, self.max_rank)
        self._namespaces += 1
        self.host[self._namespaces] = adapter
        self.requests[request.lora_int_id] = request
        self.namespace[request.lora_int_id] = self._namespaces
        return self._namespaces

    def forget(self, lora_id: int) -> None:
        """Drop an adapter's id (vLLM's unload): new requests cannot name it, while those made before (queued,
        running, preempted) keep its weights until `purge` finds none left; the id may come back with another
        folder, under a prefix namespace of its own."""
        self.requests.pop(lora_id, None)
        namespace = self.namespace.pop(lora_id, None)
        if namespace is not None:
            self.retired.add(namespace)

    def purge(self, in_use: set[int]) -> None:
        """Free forgotten adapters' host copies and slots that no request (by namespace, ``in_use``) needs."""
        for namespace in self.retired - in_use:
            self.retired.discard(namespace)
            self.host.pop(namespace, None)
            slot = self.slot_of.pop(namespace, None)
            if slot is not None:
                self.resident[slot] = None

    def can_acquire(self, namespace: int) -> bool:
        return namespace in self.slot_of or any(h == 0 for h in self.held)

    def acquire(self, namespace: int) -> int:
        """A slot holding the adapter registered as ``namespace``, held by one more request (call `can_acquire`
        first)."""
        self._clock += 1
        slot = self.slot_of.get(namespace)
        if slot is None:
            free = [s for s in range(self.max_loras) if self.held[s] == 0]
            slot = min(free, key=lambda s: (self.resident[s] is not None, self.last_use[s]))
            self._load(slot, namespace)  # first: a failure leaves the slot as it was
            if self.resident[slot] is not None:
                del self.slot_of[self.resident[slot]]
            self.resident[slot], self.slot_of[namespace] = namespace, slot
        self.held[slot] += 1
        self.last_use[slot] = self._clock
        return slot

    def release(self, slot: int) -> None:
        self.held[slot] -= 1

    def _load(self, slot: int, namespace: int) -> None:
        new = {p: (per_layer(a.astype(self.dtype)), per_layer(b.astype(self.dtype)))
               for p, (a, b) in self.host[namespace].items()}
        if self.tp is not None:
            new = self.tp.shard_lora(new, self.config)
        else:
            new = jax.device_put(new, self.device)
        self.weights, self.folded = self._write(self.weights, self.folded, new, jnp.int32(slot))

    def inputs(self, slots: Any) -> dict:
        """What a step passes the model for rows in ``slots`` (-1: no adapter): the stacks, the slots, and
        ``folded`` where kept."""
        out = {"weights": self.weights, "slots": slots}
        if self.folded is not None:
            out["folded"] = self.folded
        return out


def per_layer(stacked: np.ndarray) -> tuple[np.ndarray, ...]:
    """``[layers, ...]`` as a tuple of its layers (`LoraSlots.weights`' form)."""
    return tuple(stacked)


def fold_width(columns: int) -> int:
    """The width of a projection's folded stacks: its ``slots x R`` columns padded to whole 128s, so that the Mosaic
    GPU projection's term runs whole K steps of one or two 64-wide boxes.

    Example:
        >>> fold_width(48), fold_width(192)
        (128, 256)
    """
    return -(-columns // 128) * 128


def fold_columns(a: jax.Array, b: jax.Array, width: int | None = None) -> tuple[jax.Array, jax.Array]:
    """A layer's stacks ``a [n, R, in]`` and ``b [n, R, out]`` as the folded term reads them: ``[width, in]`` and
    ``[out, width]``, column (or row) ``s * R + r`` slot s's part r, the rest zeros (width None: `fold_width`).
    The shrink ``x @ a_cols.T`` then has the term's columns, and ``bt`` is
    `jaxserve_kernels.skinny_matmul_mgpu`'s ``term`` weight.

    Example:
        >>> a_cols, bt = fold_columns(jnp.ones((2, 3, 4)), jnp.ones((2, 3, 5)))
        >>> a_cols.shape, bt.shape
        ((128, 4), (5, 128))
    """
    n, r, _ = a.shape
    width = fold_width(n * r) if width is None else width
    a_cols = jnp.pad(a.reshape(n * r, -1), ((0, width - n * r), (0, 0)))
    return a_cols, jnp.pad(b.reshape(n * r, -1).T, ((0, 0), (0, width - n * r)))


def _write_slot(weights, folded, new, slot):
    weights = jax.tree_util.tree_map(lambda w, n: w.at[slot].set(n), weights, new)
    if folded is not None:
        def put(cols, part, axis):  # slot's R rows of a_cols (axis 0) or columns of bt (axis 1)
            at = (slot * part.shape[axis], 0) if axis == 0 else (0, slot * part.shape[axis])
            return jax.lax.dynamic_update_slice(cols, part.astype(cols.dtype), at)

        folded = {p: (tuple(put(ac, na, 0) for ac, na in zip(folded[p][0], new[p][0])),
                      tuple(put(bt, nb.T, 1) for bt, nb in zip(folded[p][1], new[p][1])))
                  for p in folded}
    return weights, folded
