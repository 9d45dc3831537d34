"""CPU time of one training forward + backward with each activation-memory option (issue 26), in one process per
option set, so that a shared machine's load shows less than in wall time: the long setting of benchmarks/memory.py
(12 x 512 model, batch 2 pairs, gradient checkpointing) at one max length, one math thread.

    OMP_NUM_THREADS=1 python benchmarks/step_cost.py STORE MODEL '{"split_sequences": true}'   # prints 3 lines

STORE and MODEL: those `python benchmarks/memory.py long --work DIR` made (DIR/train-512.lstore, DIR/model). Each
line is one iteration of the same batch: the first pays for warm-up.
"""

from __future__ import annotations

import json
import sys
import time


def main(store: str, model: str, options: dict) -> None:
    from logitstore.dpo.config import TrainConfig
    from logitstore.dpo.training import loop

    cfg = TrainConfig(model=model, store=store, out="step-cost-run", batch_size=2, lora_r=8, lora_alpha=16,
                      plot=False, **{"gradient_checkpointing": True, **options})
    run = loop.prepare(cfg)
    t = loop.load_trainee(run)
    loader, _ = run.task.loader(cfg.store, rank=0, world=1, device=t.device)
    batch = next(iter(loader))
    for _ in range(3):
        cpu, wall = time.process_time(), time.perf_counter()
        loss, _ = run.task.step(t.policy, batch, t.device)
        loss.backward()
        print(options, "cpu", round(time.process_time() - cpu, 1), "wall", round(time.perf_counter() - wall, 1),
              flush=True)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], json.loads(sys.argv[3]))
