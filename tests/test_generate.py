"""Cached generation equals re-running the prefix; sampling; bad input."""

import pytest
import torch

from ebt.config import EBTConfig, ModelConfig
from ebt.errors import ConfigError
from ebt.generate import GenerateConfig, generate, generate_uncached, sample
from ebt.models import build_model
from ebt.think import ThinkConfig


def make(kind, variant="time_embed", landscapes=2):
    torch.manual_seed(0)
    e = EBTConfig(variant=variant, landscapes=landscapes, alpha=2.0) if kind == "ebt" else None
    return build_model(ModelConfig(model=kind, size="4xs", n_layer=2, d_model=32, n_head=2, vocab_size=29,
                                   context_length=24, ebt=e)).double()


PROMPTS = [[3, 5, 7, 9, 11], [2, 4], [8, 8, 1, 6]]


@pytest.mark.parametrize("kind,variant", [("transformer", None), ("ebt", "time_embed"), ("ebt", "default")])
def test_cached_generation_equals_uncached(kind, variant):
    model = make(kind, variant or "time_embed")
    cfg = GenerateConfig(max_new_tokens=8, think=ThinkConfig(steps=3))
    a, la = generate(model, PROMPTS, cfg, return_logits=True)
    b, lb = generate_uncached(model, PROMPTS, cfg, return_logits=True)
    assert a == b
    assert torch.allclose(la, lb, rtol=1e-9, atol=1e-9)
    assert [len(x) for x in a] == [8, 8, 8]
    if kind == "transformer":  # (an EBT's random starts depend on the batch shape)
        # prompts of different lengths: a row's output does not depend on the other rows
        alone = generate(model, [PROMPTS[1]], cfg)
        assert alone[0] == a[1]


def test_sampling_rules():
    logits = torch.tensor([[0.0, 3.0, 1.0, -2.0]])
    assert sample(logits, 0.0, 1.0, None).item() == 1
    g = torch.Generator().manual_seed(0)
    draws = {sample(logits, 1.0, 0.5, g).item() for _ in range(50)}
    assert draws == {1}  # the top token alone holds more than half the mass
    draws = {sample(logits, 5.0, 1.0, g).item() for _ in range(200)}
    assert draws == {0, 1, 2, 3}


def test_generation_bad_input():
    model = make("transformer")
    with pytest.raises(ConfigError, match="empty prompt"):
        generate(model, [[1, 2], []])
    with pytest.raises(ConfigError, match="exceeds the model's context_length 24"):
        generate(model, [[1] * 20], GenerateConfig(max_new_tokens=10))
    with pytest.raises(ConfigError, match="no prompts"):
        generate(model, [])
    with pytest.raises(ConfigError, match="candidates must be >= 1"):
        GenerateConfig(think=ThinkConfig(candidates=0))
