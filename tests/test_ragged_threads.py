"""Ragged forwards switch the attention implementation of a model's shared config; other threads using the same
model meanwhile (a plain forward, another backend's ragged forward) must still get exact results, and the model
must end with its own implementation."""

from __future__ import annotations

import random
import threading

import pytest
import torch

from conftest import plain_hf_attributes
from steer_reward.backends.local import LocalBackend
from steer_reward.config import BatchingConfig
from steer_reward.formatting import EncodedSample
from steer_reward.ragged import ragged_attention_active
from test_fastpath import PAD, TOL, ids, tiny_model


def samples_and_reference(model):
    rng = random.Random(11)
    prompt = ids(rng, 30)
    samples = [EncodedSample(prompt, ids(rng, rng.randint(1, 12))) for _ in range(3)] + [
        EncodedSample(ids(rng, 9), ids(rng, 5))]
    return samples, torch.stack([plain_hf_attributes(model, s.input_ids) for s in samples])


class RaggedWindowInOtherThread:
    """Another thread inside a ragged window of ``config`` (as during its ragged forward) until ``close()``."""

    def __init__(self, config) -> None:
        self._entered, self._release = threading.Event(), threading.Event()
        self._thread = threading.Thread(target=self._hold, args=(config,), daemon=True)
        self._thread.start()
        assert self._entered.wait(10)

    def _hold(self, config) -> None:
        with ragged_attention_active(config):
            self._entered.set()
            self._release.wait(10)

    def close(self) -> None:
        self._release.set()
        self._thread.join(10)
        assert not self._thread.is_alive()


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_plain_forwards_of_other_threads_stay_exact_during_a_ragged_forward(attention):
    """A right-padded micro-batch and a left-padded HF batch (OpenRLHF's layout) of the model, while another thread
    runs a ragged forward of it."""
    model = tiny_model(attention=attention)
    samples, expected = samples_and_reference(model)
    padded = LocalBackend(model, PAD, BatchingConfig(strategy="padded"))
    sequences = [s.input_ids for s in samples]
    longest = max(map(len, sequences))
    left = torch.tensor([[PAD] * (longest - len(s)) + list(s) for s in sequences])
    mask = (left != PAD).long() if all(PAD not in s for s in sequences) else None
    window = RaggedWindowInOtherThread(model.config)
    try:
        torch.testing.assert_close(padded.attributes(samples), expected, **TOL)
        with torch.no_grad():
            torch.testing.assert_close(model(left, attention_mask=mask).logits.float(), expected, **TOL)
    finally:
        window.close()
    assert model.config._attn_implementation == attention


def test_overlapping_ragged_forwards_on_one_model_stay_exact_and_restore_the_implementation():
    """Thread A enters its ragged window before thread B's ragged forward starts and leaves it while B is between
    two layers: B's later layers still run ragged attention, and the model ends with its own implementation."""
    model = tiny_model()
    samples, expected = samples_and_reference(model)
    backend = LocalBackend(model, PAD, BatchingConfig(strategy="prefix"))
    window = RaggedWindowInOtherThread(model.config)
    hook = model.model.layers[1].register_forward_pre_hook(lambda module, args: window.close())
    try:
        got = backend.attributes(samples)
    finally:
        hook.remove()
        window.close()
    torch.testing.assert_close(got, expected, **TOL)
    assert model.config._attn_implementation == "sdpa"
