"""independent_copy: a deep copy that runs itself, even after TRL patched the model's forward."""

import copy

import torch
from trl.trainer.utils import add_fused_lm_head

from hf_align import testbed
from hf_align.masks import NeuronMask
from hf_align.sparse_update import attach_deltas, iter_deltas
from hf_align.trainers._model_copy import independent_copy


IDS = torch.tensor([[21, 22, 16, 23, 34]])


def _logits(model):
    with torch.no_grad():
        return model(input_ids=IDS).logits


def _halve_weights(model):
    with torch.no_grad():
        for param in model.parameters():
            param.mul_(0.5)


def test_deepcopy_of_a_model_with_trls_fused_head_runs_the_original_and_independent_copy_does_not():
    model = testbed.load_random_tiny()
    add_fused_lm_head(model)  # what every TRL trainer does to its model
    before = _logits(model)

    plain = copy.deepcopy(model)
    _halve_weights(plain)
    torch.testing.assert_close(_logits(plain), before)  # the hazard: the copy's forward is the original's

    clone = independent_copy(model)
    _halve_weights(clone)
    assert (_logits(clone) - before).abs().max() > 1e-3
    torch.testing.assert_close(_logits(model), before)  # the source is untouched
    fresh = testbed.load_random_tiny()
    fresh.load_state_dict(clone.state_dict())
    torch.testing.assert_close(_logits(clone), _logits(fresh))  # and the copy is exactly its own weights


def test_independent_copy_keeps_per_module_forwards_that_belong_to_the_copy():
    """Neuron deltas patch Linear forwards with methods bound to the module: the copy keeps its own."""
    model = testbed.load_random_tiny()
    attach_deltas(model, NeuronMask.random(model, 0.2, "row", seed=0))
    clone = independent_copy(model)
    before = _logits(model)
    with torch.no_grad():
        for holder in iter_deltas(clone):
            holder.delta.add_(0.5)
    assert (_logits(clone) - before).abs().max() > 1e-3
    torch.testing.assert_close(_logits(model), before)
