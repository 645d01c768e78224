"""A state dict with the TorchDEQ zoo IGNN's key names (ignn-ppi-*.pth) loads through
zoo.ignn.convert, keeps the outputs of the model it came from, and folds into plain weights."""
import pytest
import torch

from zoo.ignn.convert import load_torchdeq_checkpoint, torchdeq_to_ours
from zoo.ignn.model import IGNN

SN_CLIP = {"norm_type": "spectral_norm", "norm_clip": True, "f_max_iter": 30}
PPI_LAYERS = [(50, 1024), (1024, 512), (512, 512), (512, 256), (256, 121)]


def torchdeq_ppi_layout():
    """Key -> shape of the TorchDEQ zoo's PPI IGNN under spectral norm, from its module
    structure (zoo-upstream.md): ignn.i.{W,Omega_1,Omega_2}_{orig,g,u,v}, ignn.i.bias, proj.i."""
    keys = {}
    for i, (p, m) in enumerate(PPI_LAYERS):
        keys.update({f"ignn.{i}.W_orig": (m, m), f"ignn.{i}.W_g": (m, 1), f"ignn.{i}.W_u": (m,),
                     f"ignn.{i}.W_v": (m,), f"ignn.{i}.bias": (m, 1)})
        for om in ("Omega_1", "Omega_2"):
            keys.update({f"ignn.{i}.{om}_orig": (m, p), f"ignn.{i}.{om}_g": (m, 1), f"ignn.{i}.{om}_u": (m,),
                         f"ignn.{i}.{om}_v": (p,)})
        keys.update({f"proj.{i}.weight": (m, p), f"proj.{i}.bias": (m,)})
    return keys


def test_our_ppi_model_has_the_torchdeq_names_less_the_dead_bias():
    ours = {k: tuple(v.shape) for k, v in IGNN(50, 121, "ppi", deq=SN_CLIP).state_dict().items()}
    reference = torchdeq_ppi_layout()
    assert ours == {k: v for k, v in reference.items() if not k.endswith(".bias") or k.startswith("proj")}


def small_graph():
    from torch_geometric.data import Data

    from zoo.ignn.data import with_adjacency

    src = torch.arange(9)
    edges = torch.cat([torch.stack([src, src + 1]), torch.stack([src + 1, src])], dim=1)
    return with_adjacency(Data(x=torch.randn(10, 5, generator=torch.Generator().manual_seed(1)),
                               edge_index=edges), "raw")


def test_a_torchdeq_state_dict_loads_and_keeps_the_outputs(tmp_path):
    torch.manual_seed(0)
    source = IGNN(5, 3, "ppi", deq=SN_CLIP, widths=[8, 6, 6, 4]).eval()
    graph = small_graph()
    with torch.no_grad():
        expected, _ = source(graph)
    # the file TorchDEQ writes: DataParallel's prefix, and the reference layer's unused bias
    state = {f"module.{k}": v.clone() for k, v in source.state_dict().items()}
    for i, layer in enumerate(source.ignn):
        state[f"module.ignn.{i}.bias"] = torch.randn(layer.out_features, 1)
    path = tmp_path / "ignn-ppi-1.pth"
    torch.save(state, path)
    assert not any(k.endswith("ignn.0.bias") for k in torchdeq_to_ours(state))

    target = IGNN(5, 3, "ppi", deq=SN_CLIP, widths=[8, 6, 6, 4]).eval()
    load_torchdeq_checkpoint(target, path)
    with torch.no_grad():
        assert torch.allclose(target(graph)[0], expected, atol=1e-5)
        # folded into plain weights for deq.norm_type=none: the same function
        plain = IGNN(5, 3, "ppi", deq={"norm_type": "none", "f_max_iter": 30}, widths=[8, 6, 6, 4]).eval()
        load_torchdeq_checkpoint(plain, {"state_dict": state})
        assert torch.allclose(plain(graph)[0], expected, atol=1e-5)


def test_a_checkpoint_of_another_size_lists_what_does_not_fit():
    state = IGNN(5, 3, "ppi", deq=SN_CLIP, widths=[8, 6, 6, 4]).state_dict()
    with pytest.raises(ValueError, match=r"mis-shaped: (.*)ignn.0.W_orig: checkpoint \(8, 8\) vs model \(9, 9\)"):
        load_torchdeq_checkpoint(IGNN(5, 3, "ppi", deq=SN_CLIP, widths=[9, 6, 6, 4]), state)
