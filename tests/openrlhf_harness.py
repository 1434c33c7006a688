"""What the OpenRLHF tests share: OpenRLHF 0.11.2's own modules loaded by path, and tiny offline actor tokenizers
carrying the chat templates of the common actor families (tests/data/actor_templates).

OpenRLHF's package ``__init__`` files pull in ray, vLLM, flash-attn and pylatexenc, none of which runs on this
machine, so the modules a test runs are loaded from their files. Ray and vLLM are replaced only where OpenRLHF's
rollout code calls them (``load_samples_generator``): an in-process stand-in for Ray's object store (a ref is its
value) and vLLM's ``SamplingParams`` fields; everything between them is OpenRLHF's code.
"""

from __future__ import annotations

import asyncio
import dataclasses
import importlib.util
import sys
import types
from pathlib import Path
from types import SimpleNamespace

OPENRLHF_SPEC = importlib.util.find_spec("openrlhf")
OPENRLHF_DIR = Path(OPENRLHF_SPEC.submodule_search_locations[0]) if OPENRLHF_SPEC else None
TEMPLATES = Path(__file__).parent / "data" / "actor_templates"


def load_by_path(name: str, path: Path):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


class ModuleSwap:
    """Puts modules into ``sys.modules`` for a block and restores what was there."""

    def __init__(self) -> None:
        self.saved: dict = {}

    def put(self, name: str, module) -> None:
        self.saved.setdefault(name, sys.modules.get(name))
        sys.modules[name] = module

    def load(self, name: str, relative: str):
        self.saved.setdefault(name, sys.modules.get(name))
        return load_by_path(name, OPENRLHF_DIR / relative)

    def restore(self) -> None:
        for name, module in self.saved.items():
            if module is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = module
        self.saved.clear()


def load_agent(swap: ModuleSwap):
    """``openrlhf/utils/agent.py``: SingleTurnAgentExecutor (tokenize, left-truncate, generate, decode, reward)."""
    swap.load("openrlhf.utils.logging_utils", "utils/logging_utils.py")
    return swap.load("openrlhf_agent_under_test", "utils/agent.py")


@dataclasses.dataclass
class SamplingParams:
    """The fields of vLLM's SamplingParams that OpenRLHF's rollout code sets and reads."""

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    max_tokens: int | None = None
    min_tokens: int = 1
    skip_special_tokens: bool = False
    logprobs: int | None = None
    seed: int = 0


def _ray_standin() -> types.ModuleType:
    ray = types.ModuleType("ray")
    ray.get = lambda refs: list(refs) if isinstance(refs, list) else refs
    ray.wait = lambda refs, num_returns=1, timeout=None: (refs[:num_returns], refs[num_returns:])
    return ray


def load_samples_generator(swap: ModuleSwap):
    """``openrlhf/trainer/ppo_utils/samples_generator.py`` (dynamic filtering, experiences) with ray, vllm and its
    vLLM-engine helper replaced by in-process stand-ins."""
    swap.put("ray", _ray_standin())
    swap.put("vllm", SimpleNamespace(SamplingParams=SamplingParams))
    engine_helpers = types.ModuleType("openrlhf.trainer.ray.vllm_engine")
    engine_helpers.batch_vllm_engine_call = lambda *a, **k: (_ for _ in ()).throw(RuntimeError("no vLLM here"))
    swap.put("openrlhf.trainer.ray.vllm_engine", engine_helpers)
    swap.load("openrlhf.utils.logging_utils", "utils/logging_utils.py")
    swap.load("openrlhf.utils.utils", "utils/utils.py")
    swap.load("openrlhf.trainer.ppo_utils.experience", "trainer/ppo_utils/experience.py")
    return swap.load("openrlhf_samples_generator_under_test", "trainer/ppo_utils/samples_generator.py")


def load_reward_model_loader(swap: ModuleSwap):
    """``openrlhf/models/model.py``: ``get_llm_for_sequence_regression`` (the reward/critic loader and its
    RewardModel). ``ring_attn_utils`` imports flash-attn, which has no CPU build; its two functions serve
    ``packing_samples=True`` only, so they are stand-ins that refuse to run."""
    ring = types.ModuleType("openrlhf.models.ring_attn_utils")

    def _packing_only(*args, **kwargs):
        raise RuntimeError("packing_samples needs flash-attn")

    ring.gather_and_pad_tensor = ring.unpad_and_slice_tensor = _packing_only
    swap.put("openrlhf.models.ring_attn_utils", ring)
    swap.load("openrlhf.utils.logging_utils", "utils/logging_utils.py")
    swap.load("openrlhf.utils.utils", "utils/utils.py")
    swap.load("openrlhf.models.utils", "models/utils.py")
    return swap.load("openrlhf.models.model", "models/model.py")


@dataclasses.dataclass
class ScriptedEngine:
    """OpenRLHF's vLLM engine seam (``await engine.generate(prompt_ids, sampling_params)``) answering scripted
    responses, each ending with the actor's stop token the way vLLM returns it. ``responses(prompt_ids, call)``
    gives the text of a call's response."""

    tokenizer: object
    stop_token: str
    responses: object
    calls: list = dataclasses.field(default_factory=list)

    async def generate(self, prompt_token_ids, sampling_params, multi_modal_data=None):
        text = self.responses(prompt_token_ids, len(self.calls))
        ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        ids = ids + [self.tokenizer.convert_tokens_to_ids(self.stop_token)]
        self.calls.append((list(prompt_token_ids), ids))
        output = SimpleNamespace(token_ids=ids, text=self.tokenizer.decode(ids, skip_special_tokens=True),
                                 finish_reason="stop", logprobs=None)
        return SimpleNamespace(outputs=[output])


@dataclasses.dataclass
class EngineActor:
    """What SamplesGenerator calls on a vLLM engine actor (``.remote`` methods), run in-process: the real
    engine's ``generate_responses`` is n concurrent ``executor.execute`` calls on one prompt."""

    executor: object
    engine: ScriptedEngine

    def __post_init__(self) -> None:
        self.get_num_unfinished_requests = SimpleNamespace(remote=lambda: 0)
        self.generate_responses = SimpleNamespace(remote=self._generate_responses)

    def _generate_responses(self, prompt, label, sampling_params, max_length, hf_tokenizer, num_samples=1,
                            images=None):
        async def run():
            return await asyncio.gather(*[
                self.executor.execute(prompt=prompt, label=label, sampling_params=sampling_params,
                                      max_length=max_length, hf_tokenizer=hf_tokenizer, llm_engine=self.engine,
                                      images=images) for _ in range(num_samples)])

        return asyncio.run(run())


# -- actor tokenizers -----------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class ActorSpec:
    """A tiny tokenizer with one family's special tokens and chat template."""

    template: str
    special: tuple[str, ...]
    bos: str | None
    eos: str
    pad: str
    stop: str
    """The token the policy ends its answer with (vLLM's stop token for this family)."""
    added: tuple[str, ...] = ()
    """Ordinary (not special) added tokens, e.g. Qwen3's <think>."""
    sentencepiece: bool = False
    """Metaspace pre-tokenizer and decoder like Llama-2's sentencepiece tokenizer (decoding puts a space after a
    special token)."""


ACTORS = {
    "qwen3": ActorSpec("qwen3", ("<|endoftext|>", "<|im_start|>", "<|im_end|>"), None, "<|im_end|>",
                       "<|endoftext|>", "<|im_end|>", added=("<think>", "</think>")),
    "llama31": ActorSpec("llama31", ("<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>",
                                     "<|end_header_id|>", "<|eot_id|>", "<|eom_id|>", "<|finetune_right_pad_id|>"),
                         "<|begin_of_text|>", "<|eot_id|>", "<|finetune_right_pad_id|>", "<|eot_id|>"),
    "mistral": ActorSpec("mistral", ("<unk>", "<s>", "</s>", "[INST]", "[/INST]"), "<s>", "</s>", "<unk>", "</s>"),
    "llama2": ActorSpec("llama2", ("<unk>", "<s>", "</s>"), "<s>", "</s>", "<unk>", "</s>", sentencepiece=True),
    "gemma2": ActorSpec("gemma2", ("<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>"), "<bos>",
                        "<eos>", "<pad>", "<end_of_turn>"),
    "phi3": ActorSpec("phi3", ("<unk>", "<s>", "<|endoftext|>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"),
                      "<s>", "<|endoftext|>", "<|endoftext|>", "<|end|>"),
    "deepseek_r1": ActorSpec("deepseek_r1", ("<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>", "<｜User｜>",
                                             "<｜Assistant｜>", "<｜▁pad▁｜>"),
                             "<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>", "<｜▁pad▁｜>", "<｜end▁of▁sentence｜>",
                             added=("<think>", "</think>")),
}


def build_actor_tokenizer(name: str, folder: Path):
    """Train a byte-level (or sentencepiece-like) BPE offline on the bundled LLMBar sample, as steer_reward.demo
    does, with the family's special tokens and chat template; save it to ``folder``. Returns the tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from steer_reward.demo import sample_rows

    spec = ACTORS[name]
    corpus = [t for row in sample_rows() for t in (row["prompt"], row["chosen"], row["rejected"])]
    if spec.sentencepiece:
        tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
        tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
        tokenizer.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
        alphabet = [chr(c) for c in range(32, 127)] + ["▁", "\n"]
    else:
        tokenizer = Tokenizer(models.BPE())
        tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tokenizer.decoder = decoders.ByteLevel()
        alphabet = pre_tokenizers.ByteLevel.alphabet()
    trainer = trainers.BpeTrainer(vocab_size=1024, special_tokens=list(spec.special), initial_alphabet=alphabet,
                                  show_progress=False)
    tokenizer.train_from_iterator(corpus, trainer=trainer)
    wrapped = PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token=spec.bos, eos_token=spec.eos,
                                      pad_token=spec.pad, additional_special_tokens=[
                                          t for t in spec.special if t not in (spec.bos, spec.eos, spec.pad)])
    if spec.added:
        wrapped.add_tokens(list(spec.added))
    wrapped.chat_template = (TEMPLATES / f"{spec.template}.jinja").read_text(encoding="utf-8")
    wrapped.save_pretrained(folder)
    return wrapped
