"""MDEQ model: parameter counts of the named sizes, one training step on fixture images,
and the DEQ wiring (multi-tensor state, budget override, weight norm filter)."""
import pytest
import torch
import torch.nn.functional as F

from zoo.mdeq.data import build_datasets, digits_split
from zoo.mdeq.model import MDEQ, MDEQSize, count_parameters, get_size
from zoo.mdeq.train import classification_loss

# Counts computed from the reference code (specs/zoo.md section 2), weight norm included.
REFERENCE_PARAMS = {"tiny": 159_034, "large": 11.10e6, "imagenet_small": 16.8e6,
                    "imagenet_large": 67.1e6, "imagenet_xl": 90.5e6}


@pytest.mark.parametrize("name", sorted(REFERENCE_PARAMS))
def test_named_sizes_match_reference_parameter_counts(name):
    model = MDEQ(name, deq={"norm_type": "weight_norm"})
    assert abs(count_parameters(model) / REFERENCE_PARAMS[name] - 1) < 0.03


def test_tiny_counts_are_exact():
    model = MDEQ("tiny")
    assert count_parameters(model) == 159_034
    assert count_parameters(model.f) == 111_840  # f_theta, as computed from the reference


def _fixture_batch(tmp_path, cifar_writer):
    cifar_writer(tmp_path)
    splits = build_datasets({"name": "cifar10", "root": str(tmp_path), "augment": True})
    x = torch.stack([splits.train[i][0] for i in range(2)])
    y = torch.tensor([splits.train[i][1] for i in range(2)])
    return x, y


@pytest.mark.parametrize("size,deq", [
    ("tiny", {"f_solver": "broyden", "f_max_iter": 4, "grad": 2, "tau": 0.5}),
    pytest.param("tiny", {"f_solver": "anderson", "f_max_iter": 4, "ift": True, "b_max_iter": 4},
                 marks=pytest.mark.filterwarnings("ignore:DEQ backward solve did not reach")),
    ("large", {"f_solver": "broyden", "f_max_iter": 3, "grad": 2, "tau": 0.7}),
])
def test_one_training_step_reaches_every_parameter(tmp_path, cifar_writer, size, deq):
    torch.manual_seed(0)
    x, y = _fixture_batch(tmp_path, cifar_writer)
    model = MDEQ(size, deq={**deq, "norm_type": "weight_norm"}, dropout=0.1)
    logits, info = model(x)
    assert [tuple(l.shape) for l in logits] == [(2, 10)]
    loss = classification_loss(logits, y, gamma=0.8)
    assert torch.isfinite(loss)
    loss.backward()
    no_grad = [n for n, p in model.named_parameters()
               if p.grad is None or not torch.isfinite(p.grad).all() or p.grad.abs().sum() == 0]
    assert no_grad == []
    assert info["abs_lowest"].shape == (2,)


def test_state_is_the_branch_tuple_and_budget_can_be_overridden():
    torch.manual_seed(0)
    size = MDEQSize((8, 16, 16), (4, 8, 8), 32, expansion=2, num_groups=4, in_channels=1)
    model = MDEQ(size, deq={"f_solver": "fixed_point_iter", "f_max_iter": 5}).eval()
    x = torch.randn(3, 1, 9, 9)  # odd sizes: branches 9, 5, 3
    u = model.inject(x)
    assert [tuple(z.shape) for z in model.initial_state(u)] == [(3, 8, 9, 9), (3, 16, 5, 5), (3, 16, 3, 3)]
    seen = []
    original = model.f.forward
    model.f.forward = lambda zs, inj: seen.append([tuple(z.shape) for z in zs]) or original(zs, inj)
    with torch.no_grad():
        model(x, solver_kwargs={"f_max_iter": 2})
    calls_at_2 = len(seen)
    with torch.no_grad():
        _, info = model(x, solver_kwargs={"f_max_iter": 12})
    assert seen[0] == [(3, 8, 9, 9), (3, 16, 5, 5), (3, 16, 3, 3)]
    assert calls_at_2 <= 3 and len(seen) - calls_at_2 > calls_at_2


def test_imagenet_norm_filter_leaves_the_fusion_unnormalised():
    size = get_size("imagenet_small", channels=(8, 16, 16, 16), head_channels=(4, 4, 4, 4),
                    final_channels=16)
    model = MDEQ(size, norm_filter_out=["fuse"])
    convs = {n: m for n, m in model.f.named_modules() if isinstance(m, torch.nn.Conv2d)}
    normed = {n for n, m in convs.items() if hasattr(m, "weight_g")}
    assert normed == {n for n in convs if "fuse" not in n}
    assert any("branches" in n for n in normed)


def test_digits_micro_mdeq_training_lowers_the_loss():
    torch.manual_seed(0)
    train, _ = digits_split(seed=0)
    x, y = train.images[:64], train.labels[:64]
    size = MDEQSize((8, 16), (4, 8), 32, expansion=2, num_groups=4, in_channels=1)
    model = MDEQ(size, deq={"f_solver": "fixed_point_iter", "f_max_iter": 4, "grad": 2})
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    model.eval()
    with torch.no_grad():
        before = F.cross_entropy(model(x)[0][-1], y).item()
    model.train()
    for _ in range(20):
        loss = classification_loss(model(x)[0], y, gamma=0.8)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
    with torch.no_grad():
        after = F.cross_entropy(model(x)[0][-1], y).item()
    assert after < 0.6 * before, (before, after)  # measured: 2.30 -> 1.11


@pytest.mark.gpu
def test_tiny_training_step_on_cuda_matches_cpu(tmp_path, cifar_writer):
    torch.manual_seed(0)
    x, y = _fixture_batch(tmp_path, cifar_writer)
    deq = {"f_solver": "broyden", "f_max_iter": 6, "grad": 2, "tau": 0.5}
    cpu_model = MDEQ("tiny", deq=deq)
    gpu_model = MDEQ("tiny", deq=deq)
    gpu_model.load_state_dict(cpu_model.state_dict())
    gpu_model.to("cuda")
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    losses = []
    for model, device in ((cpu_model, "cpu"), (gpu_model, "cuda")):
        logits, _ = model(x.to(device))
        loss = classification_loss(logits, y.to(device), gamma=0.8)
        loss.backward()
        losses.append(loss.item())
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())
    assert losses[0] == pytest.approx(losses[1], rel=1e-3)
    cpu_grad = cpu_model.head.classifier.weight.grad
    torch.testing.assert_close(gpu_model.head.classifier.weight.grad.cpu(), cpu_grad, rtol=1e-2, atol=1e-4)
