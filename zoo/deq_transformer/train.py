"""Train a DEQ Transformer LM: ``python -m zoo.deq_transformer.train +experiment=<name> [overrides]``.

Experiments (configs/deq_transformer/experiment/): ``wt103_ift`` and ``wt103_ift_jr`` (the
one-block ``deq_seq`` model with Broyden and implicit differentiation, without and with
Jacobian regularisation: Table 1's IFT rows), ``wt103_final`` (``deq_lm`` with the 12-step
unrolled phantom gradient: Table 1's final row and Table 8) and ``wiki_mini`` (offline).

A step reads the next segment of every column of the ordered stream (data.LMStream),
solves for the equilibrium with the memory of the previous segment, and minimises the
mean token NLL of every returned state (fixed-point correction, weights deq.gamma^(n-1-k)),
plus the Jacobian term of `core.reg.jac_loss` when ``deq.jac_loss_weight > 0``. The
memory restarts empty at each epoch (and after a resume, which restarts mid-epoch at the
next segment). Validation is the whole valid stream in order with the memory carried,
``exp`` of the token-weighted mean NLL; the end of a run adds the unigram and Kneser-Ney
bigram baselines, a greedy continuation of a validation prompt and, with ``eval.sweep``,
the perplexity against test-time solver iterations and memory lengths
(``ppl_vs_iterations.png``, ``nfe_sweep.json``) to ``results.json``.
"""
from __future__ import annotations

import math
from typing import Any, Dict, List, Optional, Sequence

import torch
import torch.distributed as dist
from omegaconf import DictConfig, OmegaConf

from core.reg.fp_correction import fp_correction
from core.reg.jacobian import jac_loss
from zoo.common import Run, build_optimizer, build_scheduler, zoo_main
from zoo.deq_transformer.baselines import KneserNeyBigram, unigram_ppl
from zoo.deq_transformer.data import EOS, Corpus, LMStream, build_datasets
from zoo.deq_transformer.model import DEQTransformerLM, count_parameters, get_size

SIZE_FIELDS = ("n_layer", "d_model", "n_head", "d_head", "d_inner", "div_val", "pre_lnorm")


def build_model(cfg: DictConfig, n_token: Optional[int] = None) -> DEQTransformerLM:
    """The model of ``cfg.model`` for a vocabulary of `n_token` (default: ``model.n_token``, else the corpus')."""
    m = cfg.model
    if n_token is None:
        n_token = m.get("n_token") or build_datasets(cfg.data).n_token
    size = get_size(m.size, **{k: m.get(k) for k in SIZE_FIELDS})
    return DEQTransformerLM(size, int(n_token), list(m.cutoffs), deq=cfg.deq, dropout=float(m.dropout),
                            dropatt=float(m.dropatt), mem_len=int(m.mem_len), mem_gc=bool(m.mem_gc),
                            init_std=float(m.init_std))


def optimizer_options(cfg: DictConfig) -> dict:
    return {k: v for k, v in OmegaConf.to_container(cfg.optim, resolve=True).items() if v is not None}


def _rank_world() -> tuple[int, int]:
    return (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)


@torch.no_grad()
def evaluate_stream(model: torch.nn.Module, ids: torch.Tensor, device: torch.device, batch_size: int,
                    tgt_len: int, mem_len: Optional[int] = None, solver_kwargs: Optional[dict] = None,
                    max_segments: Optional[int] = None) -> tuple[Dict[str, float], Dict[str, Any]]:
    """Perplexity of `ids` read in order (memory carried), and the solver statistics.

    The global batch of `batch_size` columns is split over the ranks; NLL sums and token
    counts are all-reduced, so the result is over the same tokens on any world size.
    """
    rank, world = _rank_world()
    per_rank = max(batch_size // world, 1)
    stream = LMStream(ids, per_rank, tgt_len, rank, world)
    was_training = model.training
    model.eval()
    totals = torch.zeros(2, dtype=torch.float64, device=device)
    abs_res, rel_res, nfe = [], [], []
    mems = None
    for k, x, y in stream.segments():
        if max_segments is not None and k >= max_segments:
            break
        nlls, mems, info = model(x.to(device), y.to(device), mems, mem_len=mem_len, solver_kwargs=solver_kwargs)
        totals[0] += nlls[-1].double().sum()
        totals[1] += y.numel()
        abs_res.append(info["abs_lowest"].detach().flatten().float().cpu())
        rel_res.append(info["rel_lowest"].detach().flatten().float().cpu())
        nfe.append(float(torch.as_tensor(info.get("nfe", 0)).float().mean()))
    model.train(was_training)
    if world > 1:
        dist.all_reduce(totals)
    nll = float(totals[0] / totals[1])
    info = {"abs_lowest": torch.cat(abs_res), "rel_lowest": torch.cat(rel_res),
            "nfe": sum(nfe) / max(len(nfe), 1)}
    return {"nll": nll, "ppl": math.exp(nll), "tokens": float(totals[1])}, info


@torch.no_grad()
def greedy_continuation(model: torch.nn.Module, corpus: Corpus, prompt: torch.Tensor, n_tokens: int,
                        device: torch.device) -> str:
    """The prompt and `n_tokens` greedy tokens after it (the memory carries the context)."""
    was_training = model.training
    model.eval()
    states, mems, _ = model(prompt[None].to(device))
    crit = Run.unwrap(model).crit
    out = []
    nxt = int(crit.log_prob(states[-1][0, -1]).argmax())
    for _ in range(n_tokens):
        out.append(nxt)
        states, mems, _ = model(torch.tensor([[nxt]], device=device), mems=mems)
        nxt = int(crit.log_prob(states[-1][0, -1]).argmax())
    model.train(was_training)
    return corpus.decode(prompt.tolist()) + " || " + corpus.decode(out)


def baselines(corpus: Corpus, split: str = "valid") -> Dict[str, float]:
    """Unigram and interpolated Kneser-Ney bigram perplexity of `split` (fitted on train)."""
    ids = corpus.split(split)
    kn = KneserNeyBigram(corpus.train, corpus.n_token, corpus.index()[EOS])
    return {f"{split}/unigram_ppl": unigram_ppl(corpus.train, ids, corpus.n_token),
            f"{split}/kn_bigram_ppl": kn.ppl(ids)}


def iteration_sweep(model, ids, device, eval_cfg, tgt_len: int, mem_len: Optional[int],
                    iterations: Sequence[int]) -> List[Dict[str, float]]:
    """Perplexity and mean residuals for each test-time solver budget."""
    from zoo.common.sweep import residual_summary, sweep_rows

    def one(budget: int) -> Dict[str, float]:
        metrics, info = evaluate_stream(model, ids, device, int(eval_cfg.batch_size), tgt_len, mem_len,
                                        {"f_max_iter": budget}, eval_cfg.get("max_segments"))
        return {"ppl": metrics["ppl"], **residual_summary(info)}

    return sweep_rows(iterations, one)


def mem_len_sweep(model, ids, device, eval_cfg, tgt_len: int, mem_lens: Sequence[int]) -> List[Dict[str, float]]:
    """Perplexity for each test-time memory length."""
    rows = []
    for m in mem_lens:
        metrics, _ = evaluate_stream(model, ids, device, int(eval_cfg.batch_size), tgt_len, int(m),
                                     None, eval_cfg.get("max_segments"))
        rows.append({"mem_len": int(m), "ppl": metrics["ppl"]})
    return rows


def save_ppl_plot(rows: Sequence[Dict[str, float]], path, bigram_ppl: Optional[float], title: str) -> None:
    """ppl_vs_iterations.png: perplexity (and the bigram's line) and residual against iterations."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    its = [r["iterations"] for r in rows]
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    ax.plot(its, [r["ppl"] for r in rows], "o-", color="tab:blue", label="DEQ Transformer")
    if bigram_ppl is not None:
        ax.axhline(bigram_ppl, color="tab:gray", ls=":", label=f"Kneser-Ney bigram ({bigram_ppl:.1f})")
    ax.set_xlabel("test-time solver iterations")
    ax.set_ylabel("validation perplexity", color="tab:blue")
    ax.set_yscale("log")
    ax.legend(loc="best")
    ax2 = ax.twinx()
    ax2.semilogy(its, [r["rel_residual"] for r in rows], "s--", color="tab:red")
    ax2.set_ylabel("mean relative residual", color="tab:red")
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def test_time_report(model, corpus: Corpus, run: Run, split: str) -> Dict[str, Any]:
    """What the end of training and evaluate.py add: baselines, sweeps, plot, a continuation."""
    cfg, ev = run.cfg, run.cfg.eval
    ids = corpus.split(split)
    tgt_len = int(ev.tgt_len or cfg.train.tgt_len)
    mem_len = ev.get("mem_len")
    out: Dict[str, Any] = {}
    base = baselines(corpus, split) if ev.get("baselines") else {}
    out.update(base)
    if ev.get("sweep"):
        from zoo.common.sweep import report_sweep

        rows = iteration_sweep(model, ids, run.device, ev, tgt_len, mem_len, ev.sweep_iterations)
        out["nfe_sweep"] = rows
        if ev.get("sweep_mem_lens"):
            out["mem_len_sweep"] = mem_len_sweep(model, ids, run.device, ev, tgt_len, ev.sweep_mem_lens)
        report_sweep(rows, run, metric="ppl", metric_label=f"{split} perplexity",
                     title=f"DEQ Transformer {run.experiment}")
        if run.is_main:
            save_ppl_plot(rows, run.out_dir / "ppl_vs_iterations.png", base.get(f"{split}/kn_bigram_ppl"),
                          f"DEQ Transformer {run.experiment}: {split} perplexity")
            for row in out.get("mem_len_sweep", []):
                print(f"mem_len {row['mem_len']:>5d}  ppl {row['ppl']:.2f}")
    if ev.get("generate_tokens"):
        prompt = ids[: int(ev.get("prompt_tokens", 24))]
        out["continuation"] = greedy_continuation(model, corpus, prompt, int(ev.generate_tokens), run.device)
    return out


def lm_loss(nlls: Sequence[torch.Tensor], gamma: float) -> torch.Tensor:
    """Fixed-point correction over the returned states of the mean token NLL."""
    return fp_correction(lambda nll, _: nll.mean(), (list(nlls), None), gamma=gamma)


def train(cfg: DictConfig) -> Dict[str, float]:
    """Runs one training; returns the final validation metrics."""
    with Run(cfg, project="deq_transformer") as run:
        if cfg.train.get("cpu_threads") and run.device.type == "cpu":
            torch.set_num_threads(int(cfg.train.cpu_threads))
        corpus = build_datasets(cfg.data)  # a missing dataset stops here, before any work
        net = build_model(cfg, corpus.n_token)
        model = run.wrap(net)
        optimizer = build_optimizer(model, optimizer_options(cfg))
        steps = int(cfg.train.steps)
        scheduler = build_scheduler(optimizer, cfg.sched, steps)
        stream = LMStream(corpus.train, int(cfg.train.batch_size), int(cfg.train.tgt_len), run.rank, run.world_size)
        gamma = float(cfg.deq.gamma)
        use_jac = float(cfg.deq.jac_loss_weight) > 0 and float(cfg.deq.jac_loss_freq) > 0
        memory: Dict[str, Any] = {"mems": None}

        def batches(epoch: int, start: int = 0):
            memory["mems"] = None   # a new epoch (or a resume) starts with an empty memory
            return stream.segments(start)

        def train_step(batch, step):
            _, x, y = batch
            x, y = x.to(run.device, non_blocking=True), y.to(run.device, non_blocking=True)
            with run.autocast():
                nlls, memory["mems"], info = model(x, y, memory["mems"])
                loss = lm_loss(nlls, gamma)
                total = loss
                if use_jac:
                    f, z_star = net.last_equilibrium()
                    total = loss + jac_loss(cfg.deq, f, z_star, step=step - 1)
            run.backward_step(total, optimizer, model.parameters(), cfg.clip, scheduler)
            return {"train/loss": loss.detach(), "train/ppl": loss.detach().exp(), "deq_info": info}

        def evaluate(step):
            metrics, info = evaluate_stream(model, corpus.valid, run.device, int(cfg.eval.batch_size),
                                            int(cfg.eval.tgt_len or cfg.train.tgt_len), cfg.eval.get("mem_len"),
                                            None, cfg.eval.get("max_segments"))
            return {"valid/ppl": metrics["ppl"], "valid/nll": metrics["nll"], "deq_info": info}

        out = run.fit(model=model, optimizer=optimizer, scheduler=scheduler, train_step=train_step,
                      batches=batches, total_steps=steps, evaluate=evaluate, eval_every=cfg.train.eval_every)
        if out.status == "completed":
            extra = test_time_report(model, corpus, run, "valid")
            metrics = dict(out.metrics)
            metrics.update({k: v for k, v in extra.items() if isinstance(v, float)})
            extra = {k: v for k, v in extra.items() if not isinstance(v, float)}
            extra.update({"params": count_parameters(net), "n_token": corpus.n_token,
                          "train_tokens": corpus.train.numel(), "valid_tokens": corpus.valid.numel()})
            run.write_results(metrics, deq_stats=out.deq, extra=extra)
        return out.metrics


@zoo_main("deq_transformer")
def main(cfg: DictConfig) -> None:
    train(cfg)


if __name__ == "__main__":
    main()
