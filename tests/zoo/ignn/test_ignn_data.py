"""The PPI loader reads the raw-format fixture through PyG's class; the chains generator
builds the IGNN paper's benchmark; adjacencies and their spectral radii."""
import json

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from zoo.common import MissingDataError
from zoo.ignn.data import PPI_RAW_FILES, build_datasets, make_chains, normalised_adjacency


def ppi_cfg(root, **kw):
    return OmegaConf.create({"name": "ppi", "root": str(root), "adjacency": "raw", **kw})


def test_ppi_fixture_reads_through_pygs_class(ppi_root):
    raw = ppi_root / "raw"
    doc = json.loads((raw / "train_graph.json").read_text())
    assert doc["directed"] is False and {"nodes", "links"} <= set(doc)
    assert np.load(raw / "test_graph_id.npy").tolist() == [4] * 12  # ids numbered on across splits

    splits = build_datasets(ppi_cfg(ppi_root))
    assert (len(splits.train), len(splits.val), len(splits.test)) == (2, 1, 1)
    assert (splits.num_features, splits.num_classes, splits.multilabel) == (50, 121, True)
    assert (ppi_root / "processed").is_dir()  # PyG processed the raw files
    g = splits.train[1]
    feats = np.load(raw / "train_feats.npy")[12:24]
    labels = np.load(raw / "train_labels.npy")[12:24]
    assert torch.allclose(g.x, torch.from_numpy(feats)) and torch.equal(g.y, torch.from_numpy(labels).float())
    # raw adjacency, weight 1, symmetric, and its radius equals a dense eigen-solve
    assert torch.equal(g.adj_index, g.edge_index) and torch.all(g.adj_weight == 1)
    dense = torch.zeros(12, 12)
    dense[g.edge_index[0], g.edge_index[1]] = 1.0
    assert torch.equal(dense, dense.T)
    assert float(g.rho) == pytest.approx(float(torch.linalg.eigvalsh(dense.double()).abs().max()), rel=1e-6)


def test_missing_ppi_names_the_raw_files(tmp_path):
    (tmp_path / "raw").mkdir()
    with pytest.raises(MissingDataError, match=r"lacks 12 of 12(.|\n)*raw/train_graph\.json(.|\n)*ppi\.zip"):
        build_datasets(ppi_cfg(tmp_path))
    assert len(PPI_RAW_FILES) == 12


def test_chains_carry_the_class_on_the_head_only():
    g = make_chains(num_chains=20, chain_length=10, num_features=100, seed=3)
    assert g.num_nodes == 400 and g.x.shape == (400, 100)
    heads = g.dist == 0
    assert int(heads.sum()) == 40
    assert torch.equal(g.x[heads, :2], torch.nn.functional.one_hot(g.y[heads], 2).float())
    assert torch.count_nonzero(g.x[~heads]) == 0 and torch.count_nonzero(g.x[:, 2:]) == 0
    assert torch.bincount(g.y).tolist() == [200, 200]
    # each chain is a path 0 - 1 - ... - 9 with one class; 40 components of 9 undirected edges
    src, dst = g.edge_index
    assert g.edge_index.shape[1] == 2 * 40 * 9
    assert torch.all((g.dist[src] - g.dist[dst]).abs() == 1) and torch.equal(g.y[src], g.y[dst])
    sizes = [int(m.sum()) for m in (g.train_mask, g.val_mask, g.test_mask)]
    assert sizes == [20, 100, 200]
    assert not (g.train_mask & g.val_mask).any() and not (g.val_mask & g.test_mask).any()
    assert not (g.train_mask & g.test_mask).any()
    # the seed decides the split; the graph itself is the same
    other = make_chains(seed=4)
    assert not torch.equal(other.test_mask, g.test_mask) and torch.equal(other.edge_index, g.edge_index)


def test_chains_loader_uses_the_self_loop_normalised_adjacency():
    cfg = OmegaConf.create({"name": "chains", "seed": 0, "num_chains": 5, "chain_length": 6, "num_features": 8,
                            "num_train": 4, "num_val": 6, "num_test": 10, "adjacency": "aug_sym"})
    splits = build_datasets(cfg)
    g = splits.test[0]
    assert splits.transductive and splits.train[0] is g
    assert float(g.rho) == pytest.approx(1.0, abs=1e-6)  # D^-1/2 (A + I) D^-1/2 has radius 1
    assert g.adj_index.shape[1] == g.edge_index.shape[1] + g.num_nodes


def test_normalised_adjacency_weights():
    path = torch.tensor([[0, 1, 1, 2], [1, 0, 2, 1]])
    index, weight = normalised_adjacency(path, 3, "sym")
    expected = {(0, 1): 1 / np.sqrt(2), (1, 2): 1 / np.sqrt(2)}
    for (i, j), w in zip(index.t().tolist(), weight.tolist()):
        assert w == pytest.approx(expected[(min(i, j), max(i, j))])
    index, weight = normalised_adjacency(path, 3, "aug_sym")
    dense = torch.zeros(3, 3)
    dense[index[0], index[1]] = weight
    deg = torch.tensor([2.0, 3.0, 2.0])
    a_hat = (torch.tensor([[1.0, 1, 0], [1, 1, 1], [0, 1, 1]])) / torch.sqrt(deg[:, None] * deg[None, :])
    assert torch.allclose(dense, a_hat)
    with pytest.raises(ValueError, match="data.adjacency"):
        normalised_adjacency(path, 3, "rw")
