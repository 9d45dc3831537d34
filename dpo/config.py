"""What a build and a training run are asked to do: the settings the CLI, the library and the recipes share.
Plain dataclasses, no torch: they sit below everything that reads them."""

from __future__ import annotations

import dataclasses
from typing import Any

DEFAULT_KL_BATCH_SIZE = 8  # TRL's default per_device_train_batch_size, whose chunks KTOTrainer pairs within


@dataclasses.dataclass
class BuildConfig:
    model: str
    data: str
    out: str
    adapter: str | None = None
    dtype: str = "auto"  # resolved by dpo.models.resolve_dtype; the fingerprint records the result
    quantize: str | None = None
    device: str = "auto"
    revision: str | None = None  # of a Hub model name
    adapter_revision: str | None = None
    attn_implementation: str = "sdpa"
    device_map: str | None = None  # "auto": layers over the GPUs, then CPU, then disk (accelerate big-model inference)
    max_memory: tuple[str, ...] = ()  # per device with device_map: "0=20GiB", "cpu=60GiB"
    split: str | None = None
    max_length: int = 1024
    max_prompt_length: int | None = None
    batch_size: int = 16
    batch_tokens: int = 16384
    per_token: bool = False
    codec: str = "fixed"
    token_codec: str = "zstd"
    rows_per_shard: int | None = None  # None: about fmt.SHARD_POSITIONS positions a shard (fmt.build_rows_per_shard)
    share_prompt: bool = False  # one pass measured faster on GPU and CPU (docs/benchmarks.md)
    length_bucketing: bool = True
    skip_invalid: bool = False
    storage_options: dict[str, Any] | None = None
    reuse: tuple[str, ...] = ()  # stores whose matching pairs are copied instead of computed
    kl_batch_size: int = DEFAULT_KL_BATCH_SIZE  # unpaired data: the chunk KL completions are paired within
    top_k: int | None = None  # teacher records: the K most likely next tokens at every scored position
    sample_k: int | None = None  # or K draws from the distribution (Sparse Logit Sampling)
    topk_codec: str = "sqrt"  # value preset of top-k records (logitstore/topk_codec.py; docs/teacher.md: which)
    seed: int = 0  # of sampled records: draws depend on (seed, row, side) only



@dataclasses.dataclass
class TrainConfig:
    model: str
    store: str
    out: str
    eval_store: str | None = None
    adapter: str | None = None  # continue training this peft adapter instead of a fresh LoRA
    revision: str | None = None  # of a Hub model name
    adapter_revision: str | None = None
    lora: bool = True  # False: train every weight (the reference is in the store, so no second model copy)
    max_steps: int | None = None
    epochs: int = 1
    batch_size: int = 4
    grad_accum: int = 1
    lr: float = 5e-5
    warmup_steps: int = 0
    schedule: str = "linear"  # or "cosine", "constant"
    weight_decay: float = 0.0
    optimizer: str = "adamw"  # or "paged_adamw_8bit" (bitsandbytes)
    grad_clip: float = 1.0
    beta: float = 0.1
    loss: str | list[str] = "sigmoid"  # a loss type, or several ("sigmoid,sft") summed with loss_weights
    loss_weights: list[float] | None = None
    label_smoothing: float = 0.0
    f_divergence: str = "reverse_kl"
    f_alpha_coef: float | None = None
    ld_alpha: float | None = None  # LD-DPO; the reference comes from the store's per-token values
    use_weighting: bool = False  # WPO
    discopop_tau: float | None = None
    distill_beta: float | None = None  # distill: 0 forward KL, 1 reverse KL (TRL's default), between JSD
    tdpo_alpha: float | None = None  # TDPO2's α (default 0.5)
    desirable_weight: float = 1.0  # unpaired losses (kto, apo_zero_unpaired, bco), as TRL's KTOConfig
    undesirable_weight: float = 1.0
    lora_r: int = 8
    lora_alpha: int = 16
    lora_dropout: float = 0.05  # in effect only with disable_dropout=False
    disable_dropout: bool = True  # TRL's DPOConfig default: every dropout in the policy off, LoRA's included
    target_modules: str = "all-linear"
    quantize: str | None = None
    dtype: str = "auto"  # resolved by dpo.models.resolve_dtype when training starts
    device: str = "auto"
    attn_implementation: str = "sdpa"
    gradient_checkpointing: bool = False
    split_sequences: bool = False  # forward and backward one sequence at a time (dpo/model/split_rows.py)
    mlp_chunk: int | None = None  # the MLP over the sequence in chunks of this many tokens (dpo/model/mlp_chunks.py)
    offload_activations: bool = False  # GPU: tensors saved for backward wait in pinned CPU memory
    group_by_length: bool = False
    num_workers: int = 0
    seed: int = 0
    log_every: int = 10
    eval_every: int = 0
    save_every: int = 0
    resume: bool = False
    allow_fingerprint_mismatch: bool = False
    expect_digest: str | None = None  # refuse a training store with other contents (docs/FORMAT.md, digest)
    plot: bool = True
    storage_options: dict[str, Any] | None = None
    report_to: tuple[str, ...] = ()  # trackers each logged step also goes to (dpo/training/trackers.py)
