"""Tensor parallelism: one model's weights and KV pages split by attention head over several devices of one host
(vLLM's ``tensor_parallel_size``), Megatron-style.

Each device holds its q heads' columns of qkv_proj with the KV heads they read, its slice of the MLP's intermediate
columns (gate_up_proj), the matching input rows of o_proj and down_proj, the KV pages of its KV heads and its
vocabulary slice of the LM head; embeddings and norms are replicated. A step runs the same model code on every device
over its local shapes (`jax.shard_map`, `Steps._forward`): the attention's and the MLP's partial outputs are summed
across devices (two all-reduces a layer) and the LM head's logits gathered, so the sampler downstream runs on
replicated logits and every device picks the same tokens. Nothing else in the engine changes: the scheduler, the
page tables and the host see one engine.

The fused projections keep one matrix each: their output columns are reordered once, when the weights are placed
(`TensorParallel.shard_params`), so that each device's block holds ``[its q | its k | its v]`` (``[its gate | its
up]``) and the model's own slicing of a fused output holds on every device. Where there are more devices than KV
heads (Qwen2.5-0.5B's 2 KV heads over 4 devices) each device keeps a copy of the one KV head its q heads read, as
vLLM does; the number of devices must then be a multiple of the KV heads.

Example:
    >>> tp = TensorParallel.over(jax.devices()[:2])                           # doctest: +SKIP
    >>> local = tp.local_config(m.config)                                      # each device's heads
    >>> params = tp.shard_params(m.params, m.config)                           # reordered and placed
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from jaxserve.config import ModelConfig
from jaxserve.quantization import SCALE as QUANT_SCALE

AXIS = "tp"


def check_tensor_parallel(config: ModelConfig, size: int) -> None:
    """Raise a ValueError naming ``tensor_parallel_size`` where ``config``'s heads, MLP or vocabulary do not split
    evenly over ``size`` devices.

    Example:
        >>> check_tensor_parallel(ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=64,
        ...     num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2), 3)
        Traceback (most recent call last):
        ...
        ValueError: tensor_parallel_size 3 must divide num_attention_heads (4)
    """
    if not isinstance(size, int) or isinstance(size, bool) or size < 1:
        raise ValueError(f"tensor_parallel_size must be a positive integer, got {size!r}")
    # A classifier's vocabulary is only its replicated embedding's: nothing splits it.
    for name in ("num_attention_heads", "intermediate_size") + (() if config.num_labels else ("vocab_size",)):
        if getattr(config, name) % size:
            raise ValueError(f"tensor_parallel_size {size} must divide {name} ({getattr(config, name)})")
    kvh = config.num_key_value_heads
    if kvh % size and size % kvh:
        raise ValueError(f"tensor_parallel_size {size} must divide num_key_value_heads ({kvh}) or be a multiple "
                         f"of it (each device then keeps a copy of one KV head)")


@dataclasses.dataclass(frozen=True, eq=False)
class TensorParallel:
    """The devices one engine's model is split over (a 1-D mesh on axis ``"tp"``) and how its arrays lie there."""

    mesh: Mesh

    @classmethod
    def over(cls, devices: Sequence[jax.Device]) -> "TensorParallel":
        """A split over ``devices`` (at least two, of one host)."""
        devices = list(devices)
        if len(devices) < 2:
            raise ValueError(f"tensor parallelism needs at least two devices, got {len(devices)}")
        if len({d.id for d in devices}) != len(devices):
            raise ValueError(f"tensor parallelism's devices must be distinct, got {devices}")
        return cls(Mesh(np.array(devices), (AXIS,)))

    @property
    def size(self) -> int:
        return self.mesh.devices.size

    @property
    def devices(self) -> list[jax.Device]:
        return list(self.mesh.devices.flat)

    def key(self) -> tuple:
        """What the compiled steps depend on: the devices, in order."""
        return ("tp",) + tuple(d.id for d in self.devices)

    def kv_heads(self, config: ModelConfig) -> int:
        """KV heads held over all devices: the model's, or one a device where the devices outnumber them."""
        return max(config.num_key_value_heads, self.size)

    def local_config(self, config: ModelConfig) -> ModelConfig:
        """The config one device's share of the model has (its heads and MLP width; the vocabulary stays whole:
        the embedding is replicated, the LM head's slice is the model's ``tp_size``'s business)."""
        check_tensor_parallel(config, self.size)
        return dataclasses.replace(config, num_attention_heads=config.num_attention_heads // self.size,
                                   num_key_value_heads=self.kv_heads(config) // self.size,
                                   intermediate_size=config.intermediate_size // self.size)

    def qkv_columns(self, config: ModelConfig) -> np.ndarray:
        """Column order of the fused qkv output that gives device i the contiguous block ``[q_i | k_i | v_i]``
        (KV columns repeated where the devices outnumber the KV heads)."""
        h, kvh, d, n = config.num_attention_heads, config.num_key_value_heads, config.head_dim, self.size
        heads = np.arange(d)
        cols = []
        for i in range(n):
            q_heads = range(i * h // n, (i + 1) * h // n)
            kv_of_device = (range(i * kvh // n, (i + 1) * kvh // n) if kvh >= n else [i * kvh // n])
            cols += [qh * d + heads for qh in q_heads]
            cols += [(h + kh) * d + heads for kh in kv_of_device]
            cols += [(h + kvh + kh) * d + heads for kh in kv_of_device]
        return np.concatenate(cols)

    def gate_up_columns(self, config: ModelConfig) -> np.ndarray:
        """Column order of the fused gate/up output that gives device i ``[gate_i | up_i]``."""
        inter, n = config.intermediate_size, self.size
        local = inter // n
        return np.concatenate([np.concatenate([np.arange(i * local, (i + 1) * local),
                                               inter + np.arange(i * local, (i + 1) * local)]) for i in range(n)])

    def param_specs(self, params: Any) -> Any:
        """Each leaf's `PartitionSpec` over the mesh (LoRA slots' weights included, under ``"lora"``)."""
        from jaxserve import model as model_module

        out_axis, in_axis = (0, 1) if model_module.WEIGHT_LAYOUT == "nk" else (1, 0)

        def spec(path: tuple, leaf: Any) -> P:
            names = [getattr(k, "key", getattr(k, "idx", None)) for k in path]
            if names[0] == "lora":  # `Runner._params`: {"weights": {projection: (a, b)}, "slots"}
                if names[1] != "weights":
                    return P()
                projection, part = names[2], names[3]
                column = projection in ("qkv_proj", "gate_up_proj")
                # b [(slots,) R, out] of a fused projection (a layer's): its output columns split as the weights';
                # a [(slots,) R, in] of o_proj / down_proj: its input split as the weights' (the delta is then a
                # partial sum, added before the all-reduce).
                if (column and part == 1) or (not column and part == 0):
                    return _axis_spec(leaf.ndim - 1, leaf.ndim)
                return P()
            owner, name = names[-2], names[-1]
            if owner in ("qkv_proj", "gate_up_proj"):
                if name in ("bias", QUANT_SCALE):  # per output column (`jaxserve.quantization`'s scales too)
                    return P(AXIS)
                return _axis_spec(out_axis, 2)
            if owner in ("o_proj", "down_proj"):
                return _axis_spec(in_axis, 2) if name == "kernel" else P()
            if owner == "lm_head":  # nn.Dense: [hidden, vocab]
                return P(None, AXIS)
            return P()

        return jax.tree_util.tree_map_with_path(spec, params)

    def shard_params(self, params: Any, config: ModelConfig) -> Any:
        """``params`` (the model's own tree, any device) with the fused projections' columns reordered
        (`qkv_columns`, `gate_up_columns`) and every leaf placed on the mesh by `param_specs`."""
        check_tensor_parallel(config, self.size)
        from jaxserve import model as model_module

        out_axis = 0 if model_module.WEIGHT_LAYOUT == "nk" else 1
        qkv, gate_up = self.qkv_columns(config), self.gate_up_columns(config)

        def reorder(path: tuple, leaf: Any) -> Any:
            owner, name = getattr(path[-2], "key", None), getattr(path[-1], "key", None)
            per_column = name in ("bias", QUANT_SCALE)
            if owner == "qkv_proj":
                return jnp.take(leaf, qkv, axis=0 if per_column else out_axis)
            if owner == "gate_up_proj":
                return jnp.take(leaf, gate_up, axis=0 if per_column else out_axis)
            return leaf

        reordered = jax.tree_util.tree_map_with_path(reorder, params)
        return self.place(reordered, self.param_specs(reordered))

    def shard_lora(self, weights: dict, config: ModelConfig) -> dict:
        """LoRA weights (`jaxserve.lora.LoraSlots`' stacks or one adapter's: ``{projection: (a, b)}``) as the
        sharded model takes them: the fused projections' B columns in `shard_params`'s order, placed by
        `param_specs`."""
        order = {"qkv_proj": self.qkv_columns(config), "gate_up_proj": self.gate_up_columns(config)}
        weights = {p: (a, jax.tree.map(lambda x, o=order[p]: jnp.take(x, o, axis=-1), b) if p in order else b)
                   for p, (a, b) in weights.items()}
        specs = self.param_specs({"lora": {"weights": weights}})["lora"]["weights"]
        return self.place(weights, specs)

    def place(self, tree: Any, specs: Any) -> Any:
        return jax.tree.map(lambda x, s: jax.device_put(x, NamedSharding(self.mesh, s)), tree, specs)

    def new_kv_cache(self, config: ModelConfig, num_pages: int, page_size: int, dtype: Any) -> tuple:
        """Zeroed KV pages of every layer, ``[kv_heads, pages, page_size, head_dim]`` split on the heads: made on
        the devices where they live (no whole pool on one device first)."""
        shape = (self.kv_heads(config), num_pages, page_size, config.head_dim)
        zeros = jax.jit(lambda: jnp.zeros(shape, dtype), out_shardings=NamedSharding(self.mesh, P(AXIS)))
        return tuple((zeros(), zeros()) for _ in range(config.num_hidden_layers))

    def free_bytes(self, fraction: float) -> int | None:
        """``fraction`` of the least free accelerator memory among the devices (None on the CPU)."""
        free = []
        for d in self.devices:
            stats = d.memory_stats() if d.platform != "cpu" else None
            if not stats or "bytes_limit" not in stats:
                return None
            free.append(stats["bytes_limit"] - stats.get("bytes_in_use", 0))
        return int(min(free) * fraction)


def _axis_spec(axis: int, ndim: int) -> P:
    return P(*[AXIS if i == axis else None for i in range(ndim)])
