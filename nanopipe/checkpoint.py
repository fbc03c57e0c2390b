"""Checkpoints: save/resume a training run exactly, and load trained models for later stages.

    <base>/checkpoints/<kind>/<tag>/step_000123/      kind: base | sft, tag: e.g. d12
        model.pt          model state_dict (fp32 master weights, no `_orig_mod.`/`module.` prefixes)
        optim.pt          list of optimizer state_dicts (identical on every rank: DDP, not ZeRO)
        rank{r}.pt        per rank: dataloader state and RNG states (python, numpy, torch, cuda)
        meta.json         step, model_config, user config, loop state, metrics

A step folder is written under a hidden temp name and renamed into place only when complete, so a
killed save never leaves a folder that find_last_step would trust. The last `keep_last` are kept.
"""

import json
import random
import re
import shutil
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from nanopipe.common import UserError, atomic_write_text, get_base_dir
from nanopipe.gpt import GPT, GPTConfig
from nanopipe.tokenizer import get_tokenizer

STEP_DIR = re.compile(r"^step_(\d{6,})$")
PRODUCER = {"base": "python -m scripts.base_train", "sft": "python -m scripts.chat_sft"}


def checkpoint_root(kind: str) -> Path:
    return get_base_dir() / "checkpoints" / kind


def step_dir(checkpoint_dir, step: int) -> Path:
    return Path(checkpoint_dir) / f"step_{step:06d}"


def _complete(path: Path) -> bool:
    return (path / "meta.json").is_file() and (path / "model.pt").is_file()


def list_steps(checkpoint_dir) -> list[int]:
    """Steps with a complete checkpoint folder, ascending."""
    checkpoint_dir = Path(checkpoint_dir)
    if not checkpoint_dir.is_dir():
        return []
    steps = []
    for child in checkpoint_dir.iterdir():
        match = STEP_DIR.match(child.name)
        if match and child.is_dir() and _complete(child):
            steps.append(int(match.group(1)))
    return sorted(steps)


def find_last_step(checkpoint_dir) -> int | None:
    steps = list_steps(checkpoint_dir)
    return steps[-1] if steps else None


# ---------------------------------------------------------------------------------------------
# RNG

def rng_state() -> dict:
    """Every RNG a training step could touch, in a form torch.load(weights_only=True) accepts."""
    np_state = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict):
    random.setstate(_to_tuple(state["python"]))
    name, keys, *rest = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), *rest))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _to_tuple(obj):
    return tuple(_to_tuple(x) for x in obj) if isinstance(obj, (list, tuple)) else obj


# ---------------------------------------------------------------------------------------------
# save / load for resuming

def clean_state_dict(state_dict: dict) -> dict:
    """Drop the wrappers' prefixes: torch.compile adds `_orig_mod.`, DistributedDataParallel `module.`."""
    clean = {}
    for key, value in state_dict.items():
        while key.startswith(("_orig_mod.", "module.")):
            key = key.split(".", 1)[1]
        clean[key] = value
    return clean


def _rank_world():
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _barrier():
    if dist.is_initialized():
        dist.barrier()


def save_checkpoint(checkpoint_dir, step: int, model, optimizers, meta: dict, loader_state=None, rng=None,
                    keep_last: int = 2) -> Path:
    """Write step `step` of a run; every rank calls this (each saves its own loader/RNG state).

    `meta` must be json-able; model_config and step are added. Returns the step folder.
    """
    rank, world = _rank_world()
    checkpoint_dir = Path(checkpoint_dir)
    final = step_dir(checkpoint_dir, step)
    tmp = checkpoint_dir / f".{final.name}.tmp"
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)  # left over from a killed save
        tmp.mkdir(parents=True)
    _barrier()
    torch.save({"loader": loader_state, "rng": rng if rng is not None else rng_state()}, tmp / f"rank{rank}.pt")
    if rank == 0:
        torch.save(clean_state_dict(model.state_dict()), tmp / "model.pt")
        torch.save([opt.state_dict() for opt in optimizers], tmp / "optim.pt")
        meta = dict(meta, step=step, world_size=world, model_config=asdict(model.config))
        atomic_write_text(tmp / "meta.json", json.dumps(meta, indent=2) + "\n")
    _barrier()
    if rank == 0:
        if final.exists():  # re-saving a step (e.g. after a resume): replace it whole
            shutil.rmtree(final)
        tmp.rename(final)
        for old in list_steps(checkpoint_dir)[:-max(1, keep_last)]:
            shutil.rmtree(step_dir(checkpoint_dir, old), ignore_errors=True)
    _barrier()
    return final


def load_checkpoint(checkpoint_dir, step: int | None = None, device="cpu", rank: int = 0) -> dict:
    """{"step", "meta", "model", "optimizers", "loader", "rng"} of a saved step (the last one by default)."""
    checkpoint_dir = Path(checkpoint_dir)
    if step is None:
        step = find_last_step(checkpoint_dir)
        if step is None:
            raise UserError(f"no checkpoint in {checkpoint_dir}")
    path = step_dir(checkpoint_dir, step)
    if not _complete(path):
        raise UserError(f"no complete checkpoint for step {step} in {checkpoint_dir} (have: {list_steps(checkpoint_dir)})")
    meta = json.loads((path / "meta.json").read_text())
    rank_file = path / f"rank{rank}.pt"
    if not rank_file.exists():
        raise UserError(f"{path} was saved by {meta.get('world_size', 1)} rank(s) and has no state for rank {rank}: "
                        "resume with the same number of processes")
    per_rank = torch.load(rank_file, map_location="cpu", weights_only=True)
    return {
        "step": step,
        "meta": meta,
        "model": torch.load(path / "model.pt", map_location=device, weights_only=True),
        "optimizers": torch.load(path / "optim.pt", map_location=device, weights_only=True),
        "loader": per_rank["loader"],
        "rng": per_rank["rng"],
    }


def update_meta(checkpoint_dir, step: int, **fields):
    """Add fields (e.g. the final val_bpb, known only after the checkpoint was written) to a step's meta."""
    path = step_dir(checkpoint_dir, step) / "meta.json"
    meta = json.loads(path.read_text())
    meta.update(fields)
    atomic_write_text(path, json.dumps(meta, indent=2) + "\n")


# ---------------------------------------------------------------------------------------------
# load a trained model for the later stages

def _depth_of(tag: str):
    match = re.fullmatch(r"d(\d+)", tag)
    return int(match.group(1)) if match else None


def default_tag(kind: str) -> str:
    """The largest d<N> tag with a complete checkpoint (else the most recently written tag)."""
    root = checkpoint_root(kind)
    tags = [p for p in root.iterdir() if p.is_dir() and list_steps(p)] if root.is_dir() else []
    if not tags:
        raise UserError(f"no {kind} model in {root}: run `{PRODUCER[kind]}` first")
    depth_tags = [p for p in tags if _depth_of(p.name) is not None]
    if depth_tags:
        return max(depth_tags, key=lambda p: _depth_of(p.name)).name
    return max(tags, key=lambda p: p.stat().st_mtime).name


def build_model_from_meta(meta: dict, state_dict: dict, device) -> GPT:
    config = GPTConfig(**meta["model_config"])
    with torch.device("meta"):
        model = GPT(config)
    model.to_empty(device=device)
    model.init_weights()  # rebuilds the rotary tables; every parameter is then overwritten
    model.load_state_dict(clean_state_dict(state_dict), strict=True)
    return model


def load_model(kind: str, tag: str | None = None, step: int | None = None, device="cpu"):
    """(model in eval mode, tokenizer, meta) of a saved base or sft model: the last step of the tag by default."""
    if kind not in PRODUCER:
        raise ValueError(f"unknown checkpoint kind {kind!r}: use base or sft")
    tag = tag or default_tag(kind)
    checkpoint_dir = checkpoint_root(kind) / tag
    if not list_steps(checkpoint_dir):
        raise UserError(f"no {kind} checkpoint in {checkpoint_dir}: run `{PRODUCER[kind]}` (with --model-tag {tag}) first")
    if step is None:
        step = find_last_step(checkpoint_dir)
    path = step_dir(checkpoint_dir, step)
    if not _complete(path):
        raise UserError(f"no checkpoint for step {step} in {checkpoint_dir}: available steps {list_steps(checkpoint_dir)}")
    meta = json.loads((path / "meta.json").read_text())
    try:
        state_dict = torch.load(path / "model.pt", map_location=device, weights_only=True)
    except Exception as e:  # truncated or foreign file
        raise UserError(f"cannot read {path / 'model.pt'} ({type(e).__name__}): delete that step folder and retrain") from e
    model = build_model_from_meta(meta, state_dict, device)
    model.eval()
    tokenizer = get_tokenizer()
    if tokenizer.vocab_size != model.config.vocab_size:
        raise UserError(f"the tokenizer in {get_base_dir() / 'tokenizer'} has {tokenizer.vocab_size} tokens but the model "
                        f"in {path} was trained with {model.config.vocab_size}: retrain the model or restore its tokenizer")
    meta["checkpoint_dir"] = str(path)
    return model, tokenizer, meta
