"""Ragged forwards: many sequences in one flat row of tokens, each attending only to what a forward of it alone sees.

A ragged forward runs every linear layer, norm and rotary embedding on exactly the real tokens — no padding, no
4-D mask — and replaces only the attention (a Transformers attention function registered under
``RAGGED_ATTENTION`` and switched on for the duration of the forward):

- **self part**: causal attention inside each segment. Segments of similar length are gathered into small padded
  buckets, one fused SDPA call per bucket; right padding sits after every real key of its row, so the causal
  kernel already hides it from real queries.
- **prompt part** (completion forwards): the queries of the completions of one prompt attend, unmasked, to that
  prompt's cached keys and values, one fused call per prompt with the cache read in place (no copy per row).

The switch is the model config's ``_attn_implementation``, which every thread using the model reads. So the
registered function runs ragged attention only for calls that carry a layout, and hands any other call (a plain
forward of the same model in another thread meanwhile) to the model's own implementation, with the mask that
implementation builds; overlapping ragged forwards share one switch, turned back when the last one ends.

The two parts are combined exactly with their log-sum-exps: ``o = (e^{l₁}·o₁ + e^{l₂}·o₂) / (e^{l₁} + e^{l₂})`` is
the softmax over the union of the two key sets, which is what a plain forward of ``prompt + completion`` computes at
each completion token. Nothing concatenates keys (``DynamicCache.update`` would copy the prompt cache into every
row of every layer) and no ``(b, 1, q, k)`` additive mask is built.

Same architecture requirements as ``prefix_sharing.prefix_sharing_unsupported``: full causal attention that takes
``position_ids`` (rotary positions), Transformers attention modules that call ``ALL_ATTENTION_FUNCTIONS``.
"""

from __future__ import annotations

import contextlib
import functools
import sys
import threading
from dataclasses import dataclass, field
from typing import Hashable, Iterator, Mapping, Sequence

import torch
from torch import nn

__all__ = ["RAGGED_ATTENTION", "Segment", "RaggedLayout", "ragged_attention", "run_ragged", "attention_with_lse",
           "plan_attention_buckets", "LayerKV", "ragged_attention_active", "plain_attention_implementation"]

RAGGED_ATTENTION = "steer_reward_ragged"
"""Name of the attention function in Transformers' ``AttentionInterface`` registry (plain calls: ``sdpa``)."""

_PLAIN_OF = {RAGGED_ATTENTION: "sdpa", RAGGED_ATTENTION + "_eager": "eager"}
"""Registered names → the implementation that plain (layout-free) calls and masks go to."""
_RAGGED_OF = {plain: name for name, plain in _PLAIN_OF.items()}

LayerKV = list[tuple[torch.Tensor, torch.Tensor]]
"""Keys and values of one prompt per layer, each of shape ``(1, kv_heads, P, head_dim)`` (views are fine)."""


@dataclass(frozen=True)
class Segment:
    """One sequence of a ragged forward."""

    tokens: tuple[int, ...]
    start: int = 0
    """Position id of the first token: 0 for a prompt or a whole sequence, the prompt length for a completion."""
    prompt: Hashable | None = None
    """Completion segments: the key of the prompt KV they continue (``RaggedLayout.prompt_kv``)."""
    keep: Hashable | None = None
    """Prompt segments: keep this segment's keys and values under this key (``RaggedLayout.kept``)."""


def plan_attention_buckets(lengths: Sequence[int], call_tokens: int) -> list[list[int]]:
    """Segments grouped for the self part: length-sorted buckets minimising padded attention work plus a fixed
    cost per fused call.

    The work of a bucket is ``rows · longest²`` (query-key pairs of the padded block); one call costs
    ``call_tokens²`` pairs. Dynamic programming over the lengths sorted longest first; every index once.

    >>> plan_attention_buckets([300, 20, 290, 25], call_tokens=256)  # a GPU: similar lengths share a call
    [[0, 2], [3, 1]]
    >>> plan_attention_buckets([300, 20, 290, 25], call_tokens=16)  # a CPU: only tiny segments share
    [[0], [2], [3, 1]]
    """
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    n = len(order)
    cost = [0.0] * (n + 1)
    cut = [n] * (n + 1)
    for j in range(n - 1, -1, -1):
        longest = lengths[order[j]]
        cost[j] = float("inf")
        for end in range(j + 1, n + 1):
            candidate = (end - j) * longest * longest + call_tokens * call_tokens + cost[end]
            if candidate < cost[j]:
                cost[j], cut[j] = candidate, end
    buckets, j = [], 0
    while j < n:
        buckets.append(order[j:cut[j]])
        j = cut[j]
    return buckets


# ------------------------------------------------------------------------------------------ fused attention


def _math_attention_lse(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool,
                        scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference softmax attention in float32. Shapes: q ``(b, h, L, d)``, k/v ``(b, kv, S, d)`` →
    ``(b, h, L, d)`` in q's dtype and log-sum-exp ``(b, h, L)`` float32."""
    groups = q.shape[1] // k.shape[1]
    k = k.float().repeat_interleave(groups, dim=1)
    v = v.float().repeat_interleave(groups, dim=1)
    scores = torch.matmul(q.float(), k.transpose(-1, -2)) * scale
    if causal:
        rows, cols = scores.shape[-2:]
        scores = scores.masked_fill(torch.ones(rows, cols, dtype=torch.bool, device=q.device).triu(1), float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)
    return torch.matmul(torch.exp(scores - lse[..., None]), v).to(q.dtype), lse


def _fused_attention_lse(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool,
                         scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """PyTorch's fused SDPA kernels, asked for their log-sum-exp (the public SDPA does not return it)."""
    if q.device.type == "cpu":
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, causal, scale=scale)
        return out, lse
    groups = q.shape[1] // k.shape[1]
    if groups > 1:
        k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    if q.dtype in (torch.float16, torch.bfloat16) and q.shape[-1] <= 256:
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention(q, k, v, 0.0, causal, False, scale=scale)[:2]
    else:
        out, lse = torch.ops.aten._scaled_dot_product_efficient_attention(q, k, v, None, True, 0.0, causal,
                                                                         scale=scale)[:2]
    return out, lse[..., : q.shape[2]]


@functools.lru_cache(maxsize=None)
def _fused_kernel_agrees(device: str, dtype: torch.dtype) -> bool:
    """Whether the fused kernels give this device and dtype the reference result (checked once on a small input
    with GQA, a causal and a cross part): a kernel that is missing or reads its arguments differently falls back
    to the reference math instead of giving a wrong score."""
    generator = torch.Generator().manual_seed(0)
    tolerance = 1e-4 if dtype == torch.float32 else 2e-2
    for rows, keys, causal in ((5, 5, True), (5, 9, False)):
        q = torch.randn(2, 4, rows, 16, generator=generator).to(device, dtype)
        k = torch.randn(2, 2, keys, 16, generator=generator).to(device, dtype)
        v = torch.randn(2, 2, keys, 16, generator=generator).to(device, dtype)
        try:
            out, lse = _fused_attention_lse(q, k, v, causal, 0.25)
        except (RuntimeError, NotImplementedError):
            return False
        ref, ref_lse = _math_attention_lse(q, k, v, causal, 0.25)
        if out.shape != ref.shape or lse.shape != ref_lse.shape:
            return False
        if (out.float() - ref.float()).abs().max() > tolerance or (lse.float() - ref_lse).abs().max() > tolerance:
            return False
    return True


def attention_with_lse(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool,
                       scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax attention and its log-sum-exp. Shapes: q ``(b, h, L, d)``, k/v ``(b, kv, S, d)`` with ``h`` a
    multiple of ``kv`` (grouped-query heads) → ``(b, h, L, d)`` and ``(b, h, L)`` float32. ``causal`` aligns the
    first query with the first key (only used with ``L == S``)."""
    if _fused_kernel_agrees(str(q.device), q.dtype):
        return _fused_attention_lse(q, k, v, causal, scale)
    return _math_attention_lse(q, k, v, causal, scale)


# -------------------------------------------------------------------------------------------------- layout


@dataclass
class _Bucket:
    """Self-part gather of several segments into a padded block (or one segment read in place)."""

    span: tuple[int, int] | None
    """A lone segment's token range, read without a copy."""
    index: torch.Tensor | None = None
    """``(rows, longest)`` flat token positions; padding repeats the row's last token (after every real key)."""
    real: torch.Tensor | None = None
    """Flat ``(n_real,)`` positions of the real tokens in ``index.flatten()``."""
    target: torch.Tensor | None = None
    """``(n_real,)`` flat token positions those real tokens go back to."""


@dataclass
class RaggedLayout:
    """What one ragged forward computes: segments concatenated into one row of ``T`` tokens.

    ``prompt_kv`` holds, for completion segments, the prompt caches they read; after a forward with ``keep``
    segments, ``kept`` holds their keys and values per layer.
    """

    segments: list[Segment]
    call_tokens: int = 64
    """Fixed cost of one fused attention call, in tokens (see ``plan_attention_buckets``)."""
    prompt_kv: Mapping[Hashable, LayerKV] = field(default_factory=dict)
    kept: dict[Hashable, LayerKV] = field(default_factory=dict)
    _device_state: dict = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        if not self.segments or any(not s.tokens for s in self.segments):
            raise ValueError("a ragged forward needs at least one segment and no empty segment")
        self.lengths = [len(s.tokens) for s in self.segments]
        self.starts = [0]
        for n in self.lengths[:-1]:
            self.starts.append(self.starts[-1] + n)
        self.total = sum(self.lengths)
        self.ends = [a + n - 1 for a, n in zip(self.starts, self.lengths)]
        # Consecutive completion segments of one prompt share one prompt-part call.
        self.prompt_runs: list[tuple[Hashable, int, int]] = []
        for seg, a, n in zip(self.segments, self.starts, self.lengths):
            if seg.prompt is None:
                continue
            if self.prompt_runs and self.prompt_runs[-1][0] == seg.prompt and self.prompt_runs[-1][2] == a:
                self.prompt_runs[-1] = (seg.prompt, self.prompt_runs[-1][1], a + n)
            else:
                self.prompt_runs.append((seg.prompt, a, a + n))
        self.keeps = [(s.keep, a, a + n) for s, a, n in zip(self.segments, self.starts, self.lengths)
                      if s.keep is not None]
        if self.prompt_runs and any(s.prompt is None for s in self.segments):
            raise ValueError("a ragged forward holds completion segments only, or none")

    @property
    def is_completion(self) -> bool:
        return bool(self.prompt_runs)

    def tensors(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """``input_ids`` and ``position_ids``. Shape: ``(1, T)`` each."""
        ids = torch.tensor([t for s in self.segments for t in s.tokens], dtype=torch.long)
        positions = torch.cat([torch.arange(s.start, s.start + n) for s, n in zip(self.segments, self.lengths)])
        return ids[None].to(device), positions[None].to(device)

    def buckets(self, device: torch.device) -> list[_Bucket]:
        """Self-part buckets of this layout, built once per device."""
        key = ("buckets", str(device))
        if key not in self._device_state:
            out = []
            for bucket in plan_attention_buckets(self.lengths, self.call_tokens):
                if len(bucket) == 1:
                    a = self.starts[bucket[0]]
                    out.append(_Bucket((a, a + self.lengths[bucket[0]])))
                    continue
                longest = max(self.lengths[i] for i in bucket)
                cols = torch.arange(longest)
                rows = []
                for i in bucket:
                    rows.append(self.starts[i] + torch.clamp(cols, max=self.lengths[i] - 1))
                index = torch.stack(rows)
                valid = torch.stack([cols < self.lengths[i] for i in bucket]).flatten()
                real = valid.nonzero().flatten()
                out.append(_Bucket(None, index.to(device), real.to(device), index.flatten()[real].to(device)))
            self._device_state[key] = out
        return self._device_state[key]


# ------------------------------------------------------------------------------------- attention function


def _self_attention(layout: RaggedLayout, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
                    out: torch.Tensor, lse: torch.Tensor | None) -> None:
    """Causal attention inside each segment, written to ``out`` ``(1, h, T, d)`` and ``lse`` ``(1, h, T)``."""
    for bucket in layout.buckets(q.device):
        if bucket.span is not None:
            a, b = bucket.span
            o, l = attention_with_lse(q[:, :, a:b], k[:, :, a:b], v[:, :, a:b], True, scale)
            out[:, :, a:b] = o
            if lse is not None:
                lse[:, :, a:b] = l
            continue
        rows, longest = bucket.index.shape
        flat = bucket.index.flatten()
        # (1, heads, T, d) → (rows, heads, longest, d)
        gather = lambda x: x[0][:, flat].view(x.shape[1], rows, longest, x.shape[-1]).transpose(0, 1)  # noqa: E731
        o, l = attention_with_lse(gather(q), gather(k), gather(v), True, scale)
        out[0][:, bucket.target] = o.transpose(0, 1).reshape(q.shape[1], rows * longest, -1)[:, bucket.real]
        if lse is not None:
            lse[0][:, bucket.target] = l.transpose(0, 1).reshape(q.shape[1], rows * longest)[:, bucket.real]


def ragged_attention(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                     attention_mask: torch.Tensor | None, scaling: float | None = None, dropout: float = 0.0,
                     steer_ragged: RaggedLayout | None = None, **kwargs) -> tuple[torch.Tensor, None]:
    """Transformers attention function for a ragged forward. Shapes: ``query`` ``(1, h, T, d)``, ``key`` and
    ``value`` ``(1, kv, T, d)`` after rotary embedding → ``(1, T, h, d)``."""
    layout = steer_ragged
    if layout is None:
        raise RuntimeError("ragged attention was called without its layout (steer_ragged=...)")
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    layer = module.layer_idx
    # Views when every segment is kept (the forward's tensors hold nothing else); copies otherwise, so the keys of
    # segments scored once are not held with them.
    copy = len(layout.keeps) != len(layout.segments)
    for name, a, b in layout.keeps:
        k, v = key[:, :, a:b], value[:, :, a:b]
        layers = layout.kept.setdefault(name, [None] * module.config.num_hidden_layers)
        layers[layer] = (k.clone(), v.clone()) if copy else (k, v)
    heads, total, dim = query.shape[1], query.shape[2], query.shape[3]
    result = query.new_empty((1, total, heads, dim))
    out = result.transpose(1, 2)  # (1, h, T, d) view written in place
    if not layout.is_completion:
        _self_attention(layout, query, key, value, scale, out, None)
        return result, None
    lse_self = torch.empty((1, heads, total), dtype=torch.float32, device=query.device)
    _self_attention(layout, query, key, value, scale, out, lse_self)
    prompt_out = torch.empty_like(out)
    lse_prompt = torch.empty_like(lse_self)
    for name, a, b in layout.prompt_runs:
        prompt_k, prompt_v = layout.prompt_kv[name][layer]
        o, l = attention_with_lse(query[:, :, a:b], prompt_k, prompt_v, False, scale)
        prompt_out[:, :, a:b] = o
        lse_prompt[:, :, a:b] = l
    # Softmax over prompt keys ∪ own keys from the two partial softmaxes: the prompt part's share of the total
    # weight is sigmoid(lse_prompt − lse_self), so o = o_self + share · (o_prompt − o_self), one fused lerp.
    share = torch.sigmoid(lse_prompt - lse_self)[..., None]
    if out.dtype == torch.float32:
        out.lerp_(prompt_out, share)
    else:  # bf16 / fp16: combine in float32, round once
        out.copy_(out.float().lerp_(prompt_out.float(), share))
    return result, None


def _plain_attention(name: str, module: nn.Module):
    """The attention function a model with implementation ``name`` (``sdpa`` or ``eager``) calls by itself."""
    if name == "sdpa":
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward
    eager = getattr(sys.modules.get(type(module).__module__), "eager_attention_forward", None)
    if eager is None:
        raise RuntimeError(f"{type(module).__name__} has no eager_attention_forward to run a plain forward with")
    return eager


def _dispatcher(name: str):
    """The registered function ``name``: ragged attention for calls with a layout, the plain implementation else."""
    plain = _PLAIN_OF[name]

    def attention(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                  attention_mask: torch.Tensor | None, steer_ragged: RaggedLayout | None = None, **kwargs):
        if steer_ragged is None:  # another thread's plain forward of this model during a ragged one
            return _plain_attention(plain, module)(module, query, key, value, attention_mask, **kwargs)
        return ragged_attention(module, query, key, value, attention_mask, steer_ragged=steer_ragged, **kwargs)

    return attention


_in_ragged_forward = threading.local()
"""``depth``: ragged forwards this thread is inside (their masks are not built: ragged attention reads none)."""


def _mask_dispatcher(name: str):
    def mask(*args, **kwargs):
        if getattr(_in_ragged_forward, "depth", 0):
            return None
        from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS

        return ALL_MASK_ATTENTION_FUNCTIONS[_PLAIN_OF[name]](*args, **kwargs)

    return mask


@functools.lru_cache(maxsize=None)
def _register() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    for name in _PLAIN_OF:
        AttentionInterface.register(name, _dispatcher(name))
        AttentionMaskInterface.register(name, _mask_dispatcher(name))


_switch_lock = threading.Lock()
_switched: dict[int, list] = {}
"""``id(config)`` → [ragged forwards inside the switch, the implementation to restore], while switched."""


def plain_attention_implementation(config) -> str | None:
    """``config._attn_implementation``, or the model's own one while ragged forwards have switched it."""
    with _switch_lock:
        entry = _switched.get(id(config))
        return entry[1] if entry is not None else config._attn_implementation


@contextlib.contextmanager
def ragged_attention_active(config) -> Iterator[None]:
    """Route the model's attention through ``ragged_attention`` for the duration of one forward.

    The attention modules read ``config._attn_implementation`` at call time. It names a dispatcher that only runs
    ragged attention for calls with a layout, so plain forwards of the same model in other threads meanwhile
    (padded micro-batches, a user's own forward) run the model's own implementation and mask. Overlapping ragged
    forwards (several backends on one model, in threads) share the switch; the last one out restores the model's
    implementation.
    """
    _register()
    with _switch_lock:
        entry = _switched.get(id(config))
        if entry is None:
            previous = config._attn_implementation
            name = _RAGGED_OF.get(previous or "eager")
            if name is None:
                raise RuntimeError(f"ragged forwards need the sdpa or eager attention implementation, not {previous!r}")
            config._attn_implementation = name
            entry = _switched[id(config)] = [0, previous]
        entry[0] += 1
    depth = getattr(_in_ragged_forward, "depth", 0)
    _in_ragged_forward.depth = depth + 1
    try:
        yield
    finally:
        _in_ragged_forward.depth = depth
        with _switch_lock:
            entry[0] -= 1
            if entry[0] == 0:
                del _switched[id(config)]
                config._attn_implementation = entry[1]


def run_ragged(backbone: nn.Module, layout: RaggedLayout) -> torch.Tensor:
    """Hidden state at the last token of every segment. Shape: ``(n_segments, d)``.

    ``layout.kept`` is filled with the keys and values of the ``keep`` segments, one entry per layer: views into
    this forward's tensors when every segment is kept, copies otherwise (``ragged_attention``).
    """
    device = next(backbone.parameters()).device
    input_ids, position_ids = layout.tensors(device)
    layout.kept.clear()
    with ragged_attention_active(backbone.config):
        hidden = backbone(input_ids=input_ids, position_ids=position_ids, use_cache=False,
                          steer_ragged=layout).last_hidden_state
    return hidden[0, torch.as_tensor(layout.ends, device=hidden.device)]  # device_map: last layer elsewhere
