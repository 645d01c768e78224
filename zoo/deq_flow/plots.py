"""``flow_examples.png``: image 1, ground truth, prediction (standard colour coding) and EPE map.

The colour coding is torchvision's `flow_to_image` (Middlebury / Baker et al. wheel: hue is
the direction, saturation the magnitude); ground truth and prediction of a row share one
normalisation (the ground truth's largest valid magnitude), so their colours compare.
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch


@torch.no_grad()
def flow_examples(model: torch.nn.Module, evals: Sequence, path: Path | str, per_set: int,
                  device: torch.device) -> Path:
    """The first `per_set` pairs of every evaluation set, one row each."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from torchvision.utils import flow_to_image

    from zoo.deq_flow.metrics import epe_map
    from zoo.deq_flow.train import predict

    rows = []
    for ev in evals:
        for i in range(min(per_set, len(ev.dataset))):
            img1, img2, flow, valid = ev.dataset[i]
            pred, _, _ = predict(model, img1[None].to(device), img2[None].to(device), ev.pad_mode)
            pred = pred[0].cpu()
            valid = torch.ones(flow.shape[1:]) if valid is None else valid
            gt = flow * valid
            scale = gt.norm(dim=0).max().clamp_min(1e-6)
            # flow_to_image normalises by the largest magnitude in the batch, here the pair
            pair = torch.stack([gt, pred.clamp(-scale, scale)])
            colours = flow_to_image(pair)
            epe = epe_map(pred[None], flow[None])[0] * valid
            aepe = float(epe.sum() / valid.sum().clamp_min(1))
            rows.append((f"{ev.name} #{i}", img1, colours[0], colours[1], epe, aepe))
    fig, axes = plt.subplots(len(rows), 4, figsize=(12, 3 * len(rows)), squeeze=False)
    for ax_row, (name, img1, gt_c, pred_c, epe, aepe) in zip(axes, rows):
        ax_row[0].imshow(((img1 + 1) / 2).clamp(0, 1).permute(1, 2, 0).numpy())
        ax_row[0].set_title(f"{name}: image 1")
        ax_row[1].imshow(gt_c.permute(1, 2, 0).numpy())
        ax_row[1].set_title("ground truth")
        ax_row[2].imshow(pred_c.permute(1, 2, 0).numpy())
        ax_row[2].set_title("prediction")
        im = ax_row[3].imshow(epe.numpy(), cmap="magma")
        ax_row[3].set_title(f"EPE (mean {aepe:.2f} px)")
        fig.colorbar(im, ax=ax_row[3], fraction=0.046)
        for ax in ax_row:
            ax.axis("off")
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
