"""``backend: vllm`` — the reward model on vLLM's pooling runner (``pip install vllm``, or the CPU build).

vLLM runs ``*ForSequenceClassification`` checkpoints as classify models. Configured for last-token pooling with the
activation off (``PoolerConfig(pooling_type="LAST", use_activation=False)``), ``LLM.classify`` returns the K raw
head outputs of each sequence (without it K labels get a softmax: DESIGN.md, vLLM). Prefix caching (on by default
for LAST pooling) shares the prompt of a GRPO group across its completions; tensor parallelism spreads a model
larger than one GPU (``vllm.tensor_parallel_size``).

The formatter, schema, shaping and every face are the local backend's: only the forward differs. Token ids go in
as they were encoded (``TokensPrompt``), so vLLM never re-tokenizes.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch

from steer_reward.config import ConfigError, SteerRewardConfig
from steer_reward.formatting import EncodedSample, RewardFormatter
from steer_reward.scoring import AttributeScorer

__all__ = ["VllmBackend", "build_vllm_scorer"]


class VllmBackend:
    """Attributes of encoded samples from a ``vllm.LLM`` built with the pooling runner."""

    def __init__(self, llm: Any, num_outputs: int) -> None:
        self.llm = llm
        self.num_outputs = int(num_outputs)

    def attributes(self, samples: Sequence[EncodedSample]) -> torch.Tensor:
        """Attributes of every sample, in input order. Shape: ``(n, K)``, float32 on CPU."""
        if not samples:
            return torch.empty((0, self.num_outputs), dtype=torch.float32)
        from vllm.inputs import TokensPrompt

        outputs = self.llm.classify([TokensPrompt(prompt_token_ids=list(s.input_ids)) for s in samples],
                                    use_tqdm=False)
        values = torch.tensor([o.outputs.probs for o in outputs], dtype=torch.float32)
        if values.shape != (len(samples), self.num_outputs):
            raise RuntimeError(f"vLLM returned outputs of shape {tuple(values.shape)} for {len(samples)} samples; "
                               f"expected {self.num_outputs} per sample")
        return values


def build_vllm_scorer(config: SteerRewardConfig) -> AttributeScorer:
    """An ``AttributeScorer`` whose forward runs on vLLM (``backend: vllm``)."""
    from steer_reward.errors import require_extra
    from steer_reward.modeling import load_tokenizer, model_folder
    from steer_reward.schema import resolve_schema

    if config.model.adapter:
        raise ConfigError("model.adapter cannot be merged by backend 'vllm': merge it once with backend: local and "
                          "save the merged checkpoint, then point model.path at it")
    if config.model.device_map is not None:
        raise ConfigError("model.device_map is for backend 'local'; vLLM places the model itself "
                          "(vllm.tensor_parallel_size)")
    vllm = require_extra("vllm", "vllm")
    from transformers import AutoConfig
    from vllm.config import PoolerConfig

    folder = model_folder(config.model.path)
    hf_config = AutoConfig.from_pretrained(str(folder), trust_remote_code=config.model.trust_remote_code)
    num_outputs = int(hf_config.num_labels)
    schema = resolve_schema(config.model.schema, getattr(hf_config, "id2label", None), num_outputs)
    tokenizer = load_tokenizer(folder, config.model.trust_remote_code)
    options = config.vllm
    llm = vllm.LLM(
        model=str(folder), runner="pooling", dtype=config.model.dtype, trust_remote_code=config.model.trust_remote_code,
        max_model_len=config.model.max_length, tensor_parallel_size=options.tensor_parallel_size,
        gpu_memory_utilization=options.gpu_memory_utilization, enforce_eager=options.enforce_eager,
        # Raw regression outputs: last-token pooling, no softmax/sigmoid over the K labels.
        pooler_config=PoolerConfig(pooling_type="LAST", use_activation=False), **options.engine_args,
    )
    formatter = RewardFormatter.from_config(tokenizer, config.model)
    return AttributeScorer(formatter, VllmBackend(llm, num_outputs), schema)
