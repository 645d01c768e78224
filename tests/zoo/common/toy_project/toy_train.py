"""Train the toy DEQ through zoo.common, exactly as a project's train.py does."""
import os
import signal
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

import torch  # noqa: E402
from toy_model import build_model, evaluate, load_data  # noqa: E402

from zoo.common import Run, build_optimizer, build_scheduler, zoo_main  # noqa: E402


@zoo_main("toy", config_dir=Path(__file__).parent / "configs")
def main(cfg):
    with Run(cfg, project="toy") as run:
        dataset = load_data(cfg.data)
        model = run.wrap(build_model(cfg))
        optimizer = build_optimizer(model, cfg.optim)
        scheduler = build_scheduler(optimizer, cfg.sched, cfg.train.steps)
        batches = run.loader(dataset, batch_size=cfg.train.batch_size, shuffle=True)

        def train_step(batch, step):
            x, y = (t.to(run.device) for t in batch)
            with run.autocast():
                logits, info = model(x)
                loss = torch.nn.functional.cross_entropy(logits, y)
            run.backward_step(loss, optimizer, model.parameters(), cfg.clip, scheduler)
            # the tests' pre-emption: a signal to this process (on one rank, or on all with -1)
            if step == cfg.checkpoint.signal_at_step and cfg.checkpoint.signal_rank in (-1, run.rank):
                os.kill(os.getpid(), getattr(signal, cfg.checkpoint.signal))
            return {"train/loss": loss, "deq_info": info}

        out = run.fit(model=model, optimizer=optimizer, scheduler=scheduler, train_step=train_step,
                      batches=batches, total_steps=cfg.train.steps,
                      evaluate=lambda step: evaluate(model, dataset, run.device),
                      eval_every=cfg.train.eval_every)
        if out.status == "completed":
            run.write_results(out.metrics, deq_stats=out.deq)
            # every rank: the tests check that DDP ranks end with identical parameters
            torch.save(run.unwrap(model).state_dict(), run.out_dir / f"final_params_rank{run.rank}.pt")
        else:
            torch.save(run.unwrap(model).state_dict(), run.out_dir / "preempted_params.pt")


if __name__ == "__main__":
    main()
