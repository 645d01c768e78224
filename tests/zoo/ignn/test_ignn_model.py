"""The implicit graph layer: spectral radii against closed forms, the inf-norm projection
the forward uses (also after an optimiser step), whole-graph convergence, the implicit
gradient against the dense (I - J)^-1 solution, and the PPI model's parameter count."""
import math

import pytest
import torch
from torch_geometric.data import Batch, Data

from zoo.ignn.model import GCN, IGNN, ImplicitGraph, count_parameters, project_inf_norm, spectral_radius

SN_CLIP = {"norm_type": "spectral_norm", "norm_clip": True}


def path_edges(n):
    src = torch.arange(n - 1)
    return torch.cat([torch.stack([src, src + 1]), torch.stack([src + 1, src])], dim=1)


def complete_edges(n):
    i, j = torch.meshgrid(torch.arange(n), torch.arange(n), indexing="ij")
    keep = i != j
    return torch.stack([i[keep], j[keep]])


@pytest.mark.parametrize("n", [5, 40])  # dense path below 16 nodes, ARPACK above
def test_spectral_radius_of_path_and_complete_graphs(n):
    assert spectral_radius(path_edges(n), None, n) == pytest.approx(2 * math.cos(math.pi / (n + 1)), rel=1e-8)
    assert spectral_radius(complete_edges(n), None, n) == pytest.approx(n - 1, rel=1e-8)
    # two disconnected graphs: the larger radius
    both = torch.cat([path_edges(n), complete_edges(n) + n], dim=1)
    assert spectral_radius(both, None, 2 * n) == pytest.approx(n - 1, rel=1e-8)


def test_projection_onto_the_inf_norm_ball():
    torch.manual_seed(0)
    w = torch.randn(6, 9, dtype=torch.float64)
    w[0] *= 0.01  # a row inside the ball stays as it is
    radius = 1.5
    p = project_inf_norm(w, radius)
    rows = p.abs().sum(1)
    assert rows.max() <= radius * (1 + 1e-12)
    assert torch.equal(p[0], w[0])
    assert torch.allclose(rows[1:], torch.full((5,), radius, dtype=torch.float64))
    # each projected row is the soft threshold of |w| with one theta, signs kept (l1-ball KKT)
    for i in range(1, 6):
        kept = p[i] != 0
        theta = (w[i].abs() - p[i].abs())[kept]
        assert torch.allclose(theta, theta[0].expand_as(theta))
        assert torch.all(w[i].abs()[~kept] <= theta[0] + 1e-12)
        assert torch.all(torch.sign(p[i][kept]) == torch.sign(w[i][kept]))
    # and it is the closest point of the ball: no random point of the ball is closer
    for _ in range(200):
        q = torch.randn(9, dtype=torch.float64)
        q = q * (radius * torch.rand(()) / q.abs().sum())
        assert (w[1] - q).norm() >= (w[1] - p[1]).norm() - 1e-12


def chains_like_graph(n=12, dim=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    edges = path_edges(n)
    rho = torch.tensor([spectral_radius(edges, None, n)])
    return Data(x=torch.randn(n, dim, generator=g), edge_index=edges, adj_index=edges,
                adj_weight=torch.ones(edges.shape[1]), rho=rho, y=torch.randint(0, 2, (n,), generator=g),
                train_mask=torch.ones(n, dtype=torch.bool))


def test_the_w_the_forward_uses_stays_in_the_ball_after_an_optimiser_step():
    graph = chains_like_graph()
    model = IGNN(4, 2, "chains", deq={**SN_CLIP, "f_max_iter": 5, "grad": 2}, widths=[8])
    layer = model.ignn[0]
    bound = layer.kappa / float(graph.rho)
    opt = torch.optim.SGD(model.parameters(), lr=50.0)  # a huge step: W_orig leaves the ball
    for _ in range(2):
        logits, _ = model(graph)
        torch.nn.functional.cross_entropy(logits, graph.y).backward()
        opt.step()
        opt.zero_grad()
    from core.norm import reset_norm

    reset_norm(layer)
    used = layer.projected_weight(graph.rho.max())
    assert used.abs().sum(1).max() <= bound * (1 + 1e-5)  # float32 rounding of the row sums
    assert layer.W.abs().sum(1).max() > bound  # the projection did something
    # and it is the W of the forward's fixed point: Z* = ReLU(A^T Z* W^T + B) holds for it, not for W
    from core import get_deq
    from zoo.ignn.model import deq_for_graphs, sparse_adjacency

    layer.eval()
    adj_t = sparse_adjacency(graph.adj_index, graph.adj_weight, graph.num_nodes)
    deq = get_deq(deq_for_graphs({"f_max_iter": 500, "f_tol": 1e-7}))
    with torch.no_grad():
        z, _ = layer(graph.x, adj_t, graph.rho.max(), deq)
        b = torch.sparse.mm(adj_t, graph.x @ layer.Omega_1.t()) + graph.x @ layer.Omega_2.t()
        for w, close in ((used, True), (layer.W, False)):
            residual = (torch.relu(torch.sparse.mm(adj_t, z @ w.t()) + b) - z).norm() / z.norm()
            assert (residual < 1e-5) == close


def test_a_batch_of_graphs_is_one_state_judged_as_a_whole():
    graphs = [chains_like_graph(seed=s) for s in range(3)]
    model = IGNN(4, 2, "chains", deq={"norm_type": "none", "f_max_iter": 60, "f_tol": 1e-5}, widths=[8]).eval()
    with torch.no_grad():
        batched, info = model(Batch.from_data_list(graphs))
        single = torch.cat([model(g)[0] for g in graphs])
    assert info["abs_lowest"].shape == (1,) and float(info["abs_lowest"]) < 1e-5  # one sample: the graph
    assert torch.allclose(batched, single, atol=1e-4)


def dense_fixed_point_grad(layer, u, a, rho):
    """d(sum(c * Z*))/d(Omega_1) from the dense (I - J)^-1, J = d vec f / d vec Z at Z*."""
    w = layer.projected_weight(rho).detach()
    b = (a.t() @ (u @ layer.Omega_1.t()) + u @ layer.Omega_2.t()).detach()
    z = torch.zeros_like(b)
    for _ in range(2000):
        z = torch.relu(a.t() @ (z @ w.t()) + b)
    pre = a.t() @ (z @ w.t()) + b
    d = (pre > 0).to(z.dtype).reshape(-1)
    n, m = z.shape
    # vec in row-major order: vec(A^T Z W^T) = (A^T kron W) vec(Z)
    jac = d[:, None] * torch.kron(a.t().contiguous(), w)
    c = torch.arange(n * m, dtype=z.dtype).sin()
    g = torch.linalg.solve((torch.eye(n * m, dtype=z.dtype) - jac).t(), c)  # g = (I - J)^-T c
    g_pre = (g * d).reshape(n, m)  # dL/d(pre-activation)
    # pre = A^T U Omega_1^T + ...: dL/dOmega_1 = (A^T U)^T-contracted with g_pre
    return g_pre.t() @ (a.t() @ u), c.reshape(n, m)


def test_ift_gradient_matches_the_dense_implicit_solution():
    torch.manual_seed(0)
    n, p, m = 7, 3, 4
    edges = path_edges(n)
    a = torch.zeros(n, n, dtype=torch.float64)
    a[edges[0], edges[1]] = 1.0
    rho = torch.tensor(spectral_radius(edges, None, n), dtype=torch.float64)
    layer = ImplicitGraph(p, m, kappa=0.9).double()
    with torch.no_grad():
        layer.W.mul_(4.0)  # leave the ball, so the projection is active
    u = torch.randn(n, p, dtype=torch.float64)
    expected, c = dense_fixed_point_grad(layer, u, a, rho)
    from core import get_deq
    from zoo.ignn.model import deq_for_graphs, sparse_adjacency

    deq = get_deq(deq_for_graphs({"norm_type": "none", "ift": True, "f_max_iter": 400, "f_tol": 1e-12,
                                  "b_max_iter": 400, "b_tol": 1e-12}))
    z, _ = layer(u, sparse_adjacency(edges, None, n, torch.float64), rho, deq)
    (z * c).sum().backward()
    assert torch.allclose(layer.Omega_1.grad, expected, rtol=1e-6, atol=1e-9)


def test_ppi_parameter_count_against_the_reference():
    model = IGNN(50, 121, "ppi", deq=SN_CLIP)
    # the reference (TorchDEQ zoo models_PPI.py with spectral norm) has 4,664,206 parameters
    # (4.66M), of which the unused per-layer bias is 1024 + 512 + 512 + 256 + 121 = 2,425
    reference, dead_bias = 4_664_206, 2_425
    assert count_parameters(model) == reference - dead_bias == 4_661_781
    assert dead_bias / reference < 6e-4
    # spectral norm adds one scale per output row of W, Omega_1 and Omega_2
    plain = IGNN(50, 121, "ppi", deq={"norm_type": "none"})
    assert count_parameters(model) - count_parameters(plain) == 3 * (1024 + 512 + 512 + 256 + 121)
    assert [tuple(l.W_orig.shape) for l in model.ignn] == [(1024, 1024), (512, 512), (512, 512), (256, 256),
                                                          (121, 121)]
    assert [tuple(l.Omega_1_orig.shape) for l in model.ignn][0] == (1024, 50)
    assert [tuple(p.weight.shape) for p in model.proj] == [(1024, 50), (512, 1024), (512, 512), (256, 512),
                                                          (121, 256)]


def test_gcn_receptive_field_is_its_layer_count():
    """A node's GCN output depends on inputs at most num_layers hops away, exactly."""
    n = 9
    torch.manual_seed(0)
    for layers in (1, 2, 3):
        model = GCN(3, 2, hidden=8, num_layers=layers, dropout=0.0).eval()
        x = torch.rand(n, 3).add(0.5).requires_grad_(True)
        out, _ = model(Data(x=x, edge_index=path_edges(n)))
        out[0].sum().backward()
        reached = (x.grad.abs().sum(1) > 0).nonzero().flatten().tolist()
        assert reached == list(range(layers + 1))
