"""TRL's DPOTrainer with a logitstore store as the reference, on one process or many.

    python examples/trl_store_dpo.py --model M --store S --data pairs.jsonl --out run
    accelerate launch --config_file examples/accelerate_fsdp.yaml examples/trl_store_dpo.py --model M ...

`pairs.jsonl` holds TRL preference rows with the store's example IDs in an `id` column (what
`logitstore export --to trl` writes). Every process opens the store read-only and joins the reference values of
all rows by ID before training; TRL's sampler then hands each process its own rows, values included. No reference
model is loaded, so under FSDP or DeepSpeed ZeRO-3 there is nothing to precompute or shard for it.
"""

from __future__ import annotations

import argparse
import json


def make_trainer(model: str, store: str, data: str, out: str, *, steps: int = 3, batch_size: int = 2,
                 lr: float = 1e-4, lora: bool = False):
    import datasets
    import torch
    from transformers import AutoModelForCausalLM
    from trl import DPOConfig

    import logitstore
    from logitstore.dpo.model.loading import load_tokenizer
    from logitstore.integrations.trl import StoreDPOTrainer

    max_length = logitstore.open(store).fingerprint["tokenization"]["max_length"]  # what the store was cut at
    rows = [json.loads(line) for line in open(data, encoding="utf-8") if line.strip()]
    args = DPOConfig(output_dir=out, precompute_ref_log_probs=True, max_length=max_length, max_steps=steps,
                     per_device_train_batch_size=batch_size, learning_rate=lr, logging_steps=1, report_to=[],
                     save_strategy="no", use_cpu=not torch.cuda.is_available(), bf16=False, seed=0,
                     data_seed=0, dataloader_drop_last=True)
    peft_config = None
    if lora:
        from peft import LoraConfig

        peft_config = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules="all-linear")
    return StoreDPOTrainer(store=store, model=AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32),
                           args=args, processing_class=load_tokenizer(model),
                           train_dataset=datasets.Dataset.from_list(rows), peft_config=peft_config)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--store", required=True)
    parser.add_argument("--data", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=2, help="per process")
    parser.add_argument("--lora", action="store_true")
    a = parser.parse_args()
    trainer = make_trainer(a.model, a.store, a.data, a.out, steps=a.steps, batch_size=a.batch_size, lora=a.lora)
    trainer.train()
    trainer.save_model(a.out)


if __name__ == "__main__":
    main()
