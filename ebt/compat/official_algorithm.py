"""The official implementation's algorithm, written with our modules, for benchmarks and tests.

`OfficialAlgorithmEBT` computes the same function as `ebt.models.EBT` (same weights, same energies,
same gradients) the way the official code does:

- every energy evaluation runs the doubled sequence [step_k, x_0..x_{S-1}, y_0..y_{S-1}] through the
  backbone with an explicit (T x T) boolean mask, T = 2S (+1 with a step token), so the context
  stream is recomputed, and backpropagated through, at every step;
- training keeps every step's second-order graph until one loss.backward() (`forward`);
- generation re-runs the whole prefix for every new token (`ebt.generate.generate_uncached`).

It exists so that the speed of our fast paths is measured against a straightforward path that
provably computes the same thing (tests/test_speed_paths.py), not against a different model. No code
comes from the official repository: this follows the algorithm described in docs/method.md 2.2-2.3.
"""

from __future__ import annotations

import torch

from ebt.errors import ConfigError
from ebt.models.ebt import EBT


class OfficialAlgorithmEBT(EBT):
    """An EBT whose energy recomputes the context inside the doubled, explicitly masked sequence."""

    # dE/dp by autograd through the doubled sequence, as the official code: no written-out gradient, so a
    # plan (ebt.fast.plan.resolve_plan) keeps every step's graph until one backward ("full") by default
    energy_grad = None
    energy_grad_embedding = None

    @classmethod
    def from_model(cls, model: EBT) -> "OfficialAlgorithmEBT":
        """A copy of `model` (weights, dtype, device, alpha) running the official algorithm."""
        if not isinstance(model, EBT):
            raise ConfigError(f"expected an ebt.models.EBT, got {type(model).__name__}")
        p = next(model.parameters())
        out = cls(model.cfg).to(device=p.device, dtype=p.dtype)
        out.load_state_dict(model.state_dict())
        out.train(model.training)
        return out

    def context(self, tokens: torch.Tensor, landscape: int, first_order: bool = False):
        return tokens, landscape  # nothing is computed ahead: the energy recomputes the context

    def energy_from(self, ctx, p: torch.Tensor, pad: bool | None = None) -> torch.Tensor:  # no V padding here
        tokens, landscape = ctx[0], ctx[1]
        if len(ctx) > 2 or tokens.shape[1] != p.shape[1]:
            raise ConfigError("the official algorithm scores a candidate for every context position "
                              "(no cached offsets)")
        B, S = tokens.shape[:2]
        parts = [self.tok_emb(tokens), self.vocab_to_embed(p)]
        prefix = 0
        if self.step_emb is not None:
            parts.insert(0, self.step_emb.weight[self.landscape_key(landscape)].expand(B, 1, -1))
            prefix = 1
        h = torch.cat(parts, dim=1)
        C, T = prefix + S, prefix + 2 * S
        # context token j at position j (+prefix); candidate i at the position of the token it predicts
        positions = torch.cat([torch.arange(C), torch.arange(S) + prefix + 1]).to(p.device)
        h = self.backbone(h, positions, mask=doubled_mask(S, prefix, p.device), causal=False, fused=False)
        return self.energy_head(h[:, C:T]).squeeze(-1)


def doubled_mask(S: int, prefix: int, device) -> torch.Tensor:
    """(T, T) boolean mask over [prefix, context (S), candidates (S)]: the context is causal and never
    sees a candidate; candidate i sees the prefix, x_0..x_i and itself."""
    C = prefix + S
    mask = torch.zeros(C + S, C + S, dtype=torch.bool, device=device)
    mask[:C, :C] = torch.ones(C, C, dtype=torch.bool, device=device).tril()
    mask[C:, :C] = torch.ones(S, C, dtype=torch.bool, device=device).tril(prefix)
    mask[C:, C:] = torch.eye(S, dtype=torch.bool, device=device)
    return mask
