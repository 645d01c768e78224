"""Published DEQ-Flow checkpoints (TorchDEQ zoo / v2.0 and v1.0 key names, DataParallel's
`module.` prefix, weight norm) load through zoo.deq_flow.convert; tested on state dicts
written from the upstream module list (conftest.upstream_layout)."""
import pytest
import torch

from zoo.deq_flow.convert import load_torchdeq_checkpoint
from zoo.deq_flow.model import DEQFlow


@pytest.mark.parametrize("version", ["v2", "v1"])
def test_upstream_b_checkpoint_loads_tensor_for_tensor(upstream_state_dict, version):
    sd = upstream_state_dict("B", version)
    model = load_torchdeq_checkpoint(DEQFlow("B"), sd)
    ours = model.state_dict()
    mask = "module.update_block.mask.2.weight" if version == "v1" else "module.mask.2.weight"
    assert torch.equal(ours["mask.2.weight"], sd[mask])
    assert torch.equal(ours["update_block.gru.convq2.weight_v"], sd["module.update_block.gru.convq2.weight_v"])
    assert torch.equal(ours["cnet.layer2.0.downsample.1.running_var"],
                       sd["module.cnet.layer2.0.downsample.1.running_var"])
    assert torch.equal(ours["update_block.encoder.convc1.weight_g"].flatten(),
                       sd["module.update_block.encoder.convc1.weight_g"].flatten())


def test_upstream_h_checkpoint_loads_and_a_wrong_size_is_named(upstream_state_dict):
    sd = upstream_state_dict("H")
    load_torchdeq_checkpoint(DEQFlow("H"), sd)
    with pytest.raises(ValueError, match="model.size"):
        load_torchdeq_checkpoint(DEQFlow("B"), sd)


def test_weight_norm_is_folded_or_split_to_fit_the_model(upstream_state_dict):
    sd = upstream_state_dict("B", weight_norm=True)
    folded = load_torchdeq_checkpoint(DEQFlow("B", deq={"norm_type": "none"}), sd)
    v, g = sd["module.update_block.flow_head.conv1.weight_v"], sd["module.update_block.flow_head.conv1.weight_g"]
    expected = g * v / v.flatten(1).norm(dim=1).view(-1, 1, 1, 1)
    assert torch.allclose(folded.update_block.flow_head.conv1.weight, expected)
    # a checkpoint without weight norm, into a weight-normed model: the same function
    plain_sd = upstream_state_dict("B", weight_norm=False)
    split = load_torchdeq_checkpoint(DEQFlow("B"), plain_sd).eval()
    plain = load_torchdeq_checkpoint(DEQFlow("B", deq={"norm_type": "none"}), plain_sd).eval()
    x = (torch.rand(1, 3, 64, 64) * 2 - 1, torch.rand(1, 3, 64, 64) * 2 - 1)
    with torch.no_grad():
        a = split(*x, solver_kwargs={"f_max_iter": 2})[0][-1]
        b = plain(*x, solver_kwargs={"f_max_iter": 2})[0][-1]
    assert torch.allclose(a, b, atol=1e-4)


def test_gma_checkpoints_are_refused(upstream_state_dict):
    sd = upstream_state_dict("B")
    sd["module.attn.to_qk.weight"] = torch.zeros(1)
    with pytest.raises(ValueError, match="GMA"):
        load_torchdeq_checkpoint(DEQFlow("B"), sd)
