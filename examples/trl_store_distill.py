"""TRL's SFTTrainer distilling from a completion store's teacher records: no teacher model, no server.

    logitstore build --model TEACHER --data data.jsonl --out teacher.lstore --top-k 32 --max-length 512
    python examples/trl_store_distill.py --model STUDENT --store teacher.lstore --data data.jsonl --out run
    accelerate launch --config_file examples/accelerate_cpu.yaml examples/trl_store_distill.py --model STUDENT ...

`data.jsonl` holds TRL prompt/completion rows (`prompt` and `completion`, plain text or messages), the file the
store was built from; an `id` field names each example (without one, the trainer derives the ID the build gave it).
The student shares the teacher's tokenizer. Every process opens the store read-only; each batch's records are read
by example ID as TRL collates it, so the teacher's distributions never pass through a model.
"""

from __future__ import annotations

import argparse
import json


def make_trainer(model: str, store: str, data: str, out: str, *, steps: int = 3, batch_size: int = 2,
                 lr: float = 1e-4, beta: float | None = None, nll_weight: float = 0.0, lora: bool = False):
    import datasets
    import torch
    from transformers import AutoModelForCausalLM

    import logitstore
    from logitstore.dpo.model.loading import load_tokenizer
    from logitstore.integrations.trl import StoreDistillationConfig, StoreDistillationTrainer

    max_length = logitstore.open(store).fingerprint["tokenization"]["max_length"]  # what the store was cut at
    rows = [json.loads(line) for line in open(data, encoding="utf-8") if line.strip()]
    args = StoreDistillationConfig(output_dir=out, max_length=max_length, beta=beta, nll_weight=nll_weight,
                                   max_steps=steps, per_device_train_batch_size=batch_size, learning_rate=lr,
                                   logging_steps=1, report_to=[], save_strategy="no",
                                   use_cpu=not torch.cuda.is_available(), bf16=False, activation_checkpointing=False,
                                   seed=0, data_seed=0, dataloader_drop_last=True)
    peft_config = None
    if lora:
        from peft import LoraConfig

        peft_config = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules="all-linear")
    return StoreDistillationTrainer(store=store, model=AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32),
                                    args=args, processing_class=load_tokenizer(model),
                                    train_dataset=datasets.Dataset.from_list(rows), peft_config=peft_config)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="the student")
    parser.add_argument("--store", required=True, help="a completion store built with --top-k or --sample-k")
    parser.add_argument("--data", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=2, help="per process")
    parser.add_argument("--beta", type=float, help="0 forward KL, 1 reverse KL (default; 0 for sampled records)")
    parser.add_argument("--nll-weight", type=float, default=0.0, help="weight of the completions' NLL")
    parser.add_argument("--lora", action="store_true")
    a = parser.parse_args()
    from logitstore.errors import LogitstoreError

    try:
        trainer = make_trainer(a.model, a.store, a.data, a.out, steps=a.steps, batch_size=a.batch_size, beta=a.beta,
                               nll_weight=a.nll_weight, lora=a.lora)
    except LogitstoreError as error:  # a store, data or student that cannot train: one line, exit 1
        raise SystemExit(f"Error: {error}") from None
    trainer.train()
    trainer.save_model(a.out)


if __name__ == "__main__":
    main()
