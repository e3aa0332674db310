"""Full fine-tuning: the expert is every parameter of the backbone (the paper's full-parameter
dataset experts, the multitask baseline, and Mixture-of-Experts models upcycled from a dense
checkpoint). It adds no module; its task vectors start from the pretrained values."""

from __future__ import annotations

from elm_jax.models.experts.base import ExpertKind


class FullKind(ExpertKind):
  name = "full"
  trains_backbone = True

  routing_refusal = ("a full fine-tune replaces every backbone parameter, so there is no added module "
                     "whose output routing could mix; merge full fine-tunes or score them one by one")

  def describe(self, config) -> str:
    return "full fine-tunes"


KIND = FullKind()
