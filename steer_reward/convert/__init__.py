"""NeMo SteerLM reward checkpoints → Hugging Face ``LlamaForSequenceClassification`` folders.

>>> from steer_reward.convert import convert_nemo, inspect_nemo       # doctest: +SKIP
>>> print(inspect_nemo("/models/Llama3-70B-SteerLM-RM").text())        # doctest: +SKIP
>>> convert_nemo("/models/Llama3-70B-SteerLM-RM", "/models/rm-hf",
...              tokenizer="/models/Meta-Llama-3-70B")                    # doctest: +SKIP

Modules: ``source`` (folder or tar), ``nemo_config`` (model_config.yaml), ``formats`` and the readers
(``torch_dist_format``, ``zarr_format``, ``legacy_format``), ``mapping`` (Megatron → HF names and splits),
``safetensors_writer`` (streaming shards), ``tokenizer``, ``convert`` and ``inspect``.
"""

from steer_reward.convert.convert import ConversionResult, convert_nemo
from steer_reward.convert.inspect import CheckpointReport, inspect_nemo
from steer_reward.convert.source import NemoCheckpointError

__all__ = ["convert_nemo", "inspect_nemo", "ConversionResult", "CheckpointReport", "NemoCheckpointError"]
