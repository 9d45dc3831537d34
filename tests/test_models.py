"""Naming models: local folders and Hugging Face Hub names (from a cache laid out as huggingface_hub lays it out,
offline); the dtype "auto" chooses; attention implementations."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import pytest

from logitstore.dpo.model import loading as models
from logitstore.dpo.model.loading import ModelError, checkpoint_dtype, model_fingerprint, resolve_dtype, resolve_model

from cli_process import run_cli
from sample_data import implicit_rows, write_jsonl

COMMIT = "0123456789abcdef0123456789abcdef01234567"
OLDER = "fedcba9876543210fedcba9876543210fedcba98"


def add_to_hub_cache(hub: Path, repo_id: str, folder: Path, commit: str, refs: tuple[str, ...] = ("main",)) -> Path:
    """Put `folder`'s files in `hub` as snapshot_download leaves them: content-addressed blobs, a snapshot folder
    of links named after the commit, and refs naming the commit."""
    repo = hub / f"models--{repo_id.replace('/', '--')}"
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True)
    (repo / "blobs").mkdir(exist_ok=True)
    for path in sorted(folder.iterdir()):
        data = path.read_bytes()
        blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
        blob.write_bytes(data)
        (snapshot / path.name).symlink_to(os.path.relpath(blob, snapshot))
    (repo / "refs").mkdir(exist_ok=True)
    for ref in refs:
        (repo / "refs" / ref).write_text(commit)
    return snapshot


@pytest.fixture(scope="module")
def hub_home(byte_model, tmp_path_factory):
    """HF_HOME with tiny-org/tiny-mistral at two commits (main and the tag v1 on the newer one) and no network."""
    home = tmp_path_factory.mktemp("hf_home")
    older = tmp_path_factory.mktemp("older")
    for path in byte_model.iterdir():
        shutil.copy(path, older / path.name)
    config = json.loads((older / "config.json").read_text())
    (older / "config.json").write_text(json.dumps({**config, "rms_norm_eps": 1e-5}))
    add_to_hub_cache(home / "hub", "tiny-org/tiny-mistral", older, OLDER, refs=())
    add_to_hub_cache(home / "hub", "tiny-org/tiny-mistral", byte_model, COMMIT, refs=("main", "v1"))
    return home


@pytest.fixture
def offline_hub(hub_home, monkeypatch):
    """This process's huggingface_hub reads its settings at import, so they are set on it as well as in the
    environment (which subprocesses read)."""
    from huggingface_hub import constants

    monkeypatch.setenv("HF_HOME", str(hub_home))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(hub_home / "hub"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(models, "_RESOLVED", {})
    return hub_home


def test_a_hub_name_resolves_to_its_cached_snapshot_and_commit(offline_hub):
    snapshots = offline_hub / "hub" / "models--tiny-org--tiny-mistral" / "snapshots"
    for revision, commit in ((None, COMMIT), ("main", COMMIT), ("v1", COMMIT), (OLDER, OLDER)):
        source = resolve_model("tiny-org/tiny-mistral", revision)
        assert (source.path, source.repo_id, source.commit) == (snapshots / commit, "tiny-org/tiny-mistral", commit)


def test_names_that_resolve_to_nothing_say_what_was_tried(offline_hub, tmp_path):
    cache = offline_hub / "hub"
    cases = {
        ("tiny-org/absent", None): f"tiny-org/absent: no such model folder, and revision 'main' is not in the "
                                   f"Hugging Face cache ({cache}); HF_HUB_OFFLINE is set, so nothing was downloaded",
        ("tiny-org/tiny-mistral", "v9"): f"tiny-org/tiny-mistral: no such model folder, and revision 'v9' is not in "
                                         f"the Hugging Face cache ({cache}); HF_HUB_OFFLINE is set, so nothing was "
                                         "downloaded",
        (str(tmp_path / "nope"), None): f"{tmp_path / 'nope'}: no such model folder",
        ("./nope", None): "./nope: no such model folder",
        (str(tmp_path), "main"): f"{tmp_path}: --revision applies to Hugging Face Hub names, not to a local folder",
    }
    for (name, revision), message in cases.items():
        with pytest.raises(ModelError) as info:
            resolve_model(name, revision)
        assert str(info.value) == message


def test_the_fingerprint_of_a_hub_name_is_its_files_plus_repository_and_commit(offline_hub, byte_model):
    by_name = model_fingerprint("tiny-org/tiny-mistral", adapter=None, dtype="auto", quantize=None, device="cpu")
    by_folder = model_fingerprint(byte_model, adapter=None, dtype="float32", quantize=None, device="cpu")
    assert by_name["hub"] == {"model": {"repo": "tiny-org/tiny-mistral", "commit": COMMIT}}
    assert "hub" not in by_folder
    assert {k: v for k, v in by_name.items() if k != "hub"} == by_folder  # auto on a CPU is recorded as float32
    older = model_fingerprint("tiny-org/tiny-mistral", revision=OLDER, adapter=None, dtype="auto", quantize=None)
    assert older["model"]["configs"] != by_name["model"]["configs"]
    assert older["hub"]["model"]["commit"] == OLDER


@pytest.mark.slow
def test_build_train_and_verify_take_a_hub_name_offline(offline_hub, byte_model, tmp_path):
    import logitstore

    hub_home = offline_hub
    env = {"HF_HOME": str(hub_home), "HF_HUB_OFFLINE": "1"}
    data = write_jsonl(tmp_path / "d.jsonl", implicit_rows(8))
    built = run_cli("build", "--model", "tiny-org/tiny-mistral", "--revision", "v1", "--data", str(data), "--out",
                 str(tmp_path / "s"), "--max-length", "256", "--quiet", env=env)
    assert built.returncode == 0, built.stderr
    fingerprint = logitstore.open(tmp_path / "s").fingerprint
    assert fingerprint["hub"] == {"model": {"repo": "tiny-org/tiny-mistral", "commit": COMMIT}}
    assert fingerprint["precision"] == {"dtype": "float32", "quantize": None}
    # The same files as a local folder train from the store, and so does the name at the commit it resolved to.
    for model, extra in ((str(byte_model), ()), ("tiny-org/tiny-mistral", ("--revision", COMMIT))):
        trained = run_cli("train", "--model", model, *extra, "--store", str(tmp_path / "s"), "--out",
                       str(tmp_path / f"run{len(extra)}"), "--max-steps", "1", "--batch-size", "4", "--quiet", env=env)
        assert trained.returncode == 0, trained.stderr
        assert trained.stdout.startswith("Trained 1 steps; last logged loss 0.6931.")
    verified = run_cli("verify", str(tmp_path / "s"), "--model", "tiny-org/tiny-mistral", "--data", str(data),
                    "--sample", "4", env=env)
    assert verified.returncode == 0 and verified.stdout.strip().endswith("sound"), verified.stdout + verified.stderr
    missing = run_cli("build", "--model", "tiny-org/nothing", "--data", str(data), "--out", str(tmp_path / "t"),
                   "--quiet", env=env)
    assert (missing.returncode, missing.stderr) == (
        1, f"Error: tiny-org/nothing: no such model folder, and revision 'main' is not in the Hugging Face cache "
           f"({hub_home / 'hub'}); HF_HUB_OFFLINE is set, so nothing was downloaded\n")
    assert not (tmp_path / "t").exists()


def test_a_hub_adapter_is_resolved_like_a_model(offline_hub, byte_model, tmp_path):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(str(byte_model))
    get_peft_model(base, LoraConfig(r=2, target_modules=["q_proj"])).save_pretrained(str(tmp_path / "lora"))
    add_to_hub_cache(offline_hub / "hub", "tiny-org/lora", tmp_path / "lora", COMMIT)
    try:
        fp = model_fingerprint(byte_model, adapter="tiny-org/lora", dtype="float32", quantize=None)
        assert fp["hub"] == {"adapter": {"repo": "tiny-org/lora", "commit": COMMIT}}
        assert fp["adapter"] == models.folder_identity(tmp_path / "lora")
        assert models.load_model(byte_model, adapter="tiny-org/lora").peft_config["default"].r == 2
    finally:
        shutil.rmtree(offline_hub / "hub" / "models--tiny-org--lora")


# ---- dtype auto -----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("checkpoint,device,bf16,expected", [
    ("bfloat16", "cpu", False, "float32"),
    ("float16", "cpu", False, "float32"),
    ("bfloat16", "cuda", True, "bfloat16"),   # Ampere and later
    ("bfloat16", "cuda", False, "float32"),   # Turing, Volta: no native bfloat16
    ("float16", "cuda", True, "float16"),
    ("float16", "cuda", False, "float16"),
    ("float32", "cuda", True, "float32"),
    (None, "cuda", True, "float32"),
    ("bfloat16", "mps", False, "float32"),
])
def test_auto_dtype(checkpoint, device, bf16, expected):
    assert resolve_dtype("auto", checkpoint=checkpoint, device_type=device, bf16_supported=bf16) == expected


def test_an_explicit_dtype_is_kept_and_an_unknown_one_refused():
    assert resolve_dtype("bfloat16", checkpoint="float32", device_type="cpu", bf16_supported=False) == "bfloat16"
    with pytest.raises(ModelError, match=r"^unknown dtype 'fp8'; choose auto or one of float32, bfloat16, float16$"):
        resolve_dtype("fp8", checkpoint=None, device_type="cpu", bf16_supported=False)


@pytest.mark.parametrize("config,expected", [({"dtype": "bfloat16"}, "bfloat16"), ({"torch_dtype": "float16"}, "float16"),
                                             ({"torch_dtype": "torch.bfloat16"}, "bfloat16"), ({}, None),
                                             ({"text_config": {"dtype": "bfloat16"}}, "bfloat16"),
                                             ({"dtype": "int8"}, None)])
def test_checkpoint_dtype_reads_config(tmp_path, config, expected):
    (tmp_path / "config.json").write_text(json.dumps(config))
    assert checkpoint_dtype(tmp_path) == expected


def test_a_bfloat16_checkpoint_loads_in_float32_on_cpu(byte_model, tmp_path):
    import torch

    folder = tmp_path / "bf16"
    shutil.copytree(byte_model, folder)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "dtype": "bfloat16"}))
    assert models.model_dtype(folder, "auto", "cpu") == "float32"
    assert next(models.load_model(folder, device="cpu").parameters()).dtype == torch.float32
    assert next(models.load_model(folder, dtype="bfloat16", device="cpu").parameters()).dtype == torch.bfloat16


# ---- attention ------------------------------------------------------------------------------------------------

def test_eager_attention_scores_as_sdpa(mistral_model):
    import torch

    from logitstore.dpo.model.scoring import pair_logps_full

    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(3, 32000, (n,), generator=g) for n in (12, 7)]
    chosen = [torch.randint(3, 32000, (n,), generator=g) for n in (3, 5)]
    rejected = [torch.randint(3, 32000, (n,), generator=g) for n in (4, 2)]
    out = {}
    for attn in ("sdpa", "eager"):
        model = models.load_model(mistral_model, attn_implementation=attn).eval()
        assert model.config._attn_implementation == attn
        out[attn] = pair_logps_full(model, prompts, chosen, rejected, pad_id=0)
    for a, b in zip(out["sdpa"][0] + out["sdpa"][1], out["eager"][0] + out["eager"][1]):
        assert torch.max(torch.abs(a - b)) < 1e-5


def test_flash_attention_is_refused_in_one_line_where_it_cannot_run(mistral_model, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "flash_attn" else real(name, *a))
    with pytest.raises(ModelError) as info:
        models.load_model(mistral_model, attn_implementation="flash_attention_2")
    assert str(info.value) == ("--attn-implementation flash_attention_2 needs the flash-attn package, which is not "
                               "installed (pip install flash-attn --no-build-isolation); sdpa needs nothing")
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: object() if name == "flash_attn" else real(name, *a))
    with pytest.raises(ModelError, match=r"^flash_attention_2 runs on CUDA GPUs only, not on cpu; use sdpa$"):
        models.load_model(mistral_model, attn_implementation="flash_attention_2", device="cpu")
    with pytest.raises(ModelError, match="^flash_attention_2 computes in bfloat16 or float16, not float32"):
        models.check_attention("flash_attention_2", device="cuda", dtype="float32")
    models.check_attention("flash_attention_2", device="cuda:0", dtype="bfloat16")
