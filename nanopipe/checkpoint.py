"""Checkpoints: save/resume a training run exactly, and load trained models for later stages.

    <base>/checkpoints/<source>/<tag>/step_000123/    source: base | sft (-i), tag: e.g. d12
        model.safetensors model state_dict (fp32 master weights, no `_orig_mod.`/`module.` prefixes)
        optim.pt          list of optimizer state_dicts (identical on every rank: DDP, not ZeRO)
        rank{r}.pt        per rank: dataloader state and RNG states (python, numpy, torch, cuda)
        meta.json         step, model_config, user config, loop state, metrics, the step's log record

Nothing is unpickled on load: weights are safetensors, the .pt files are read with weights_only=True.
Checkpoints of older versions (model.pt) still load. A step folder is written under a hidden temp name and
renamed into place only when complete, so a killed save never leaves a folder that find_last_step would
trust; old steps are pruned (the last `keep_last` kept) by renaming them away first, and whatever a kill
left behind is removed by the next save. Every part is checked when opened: a damaged one is a UserError
naming the file and what to do.
"""

import json
import random
import re
import shutil
from dataclasses import asdict
from pathlib import Path

import numpy as np
import safetensors.torch
import torch
import torch.distributed as dist

from nanopipe.common import UserError, atomic_write_text, disk_space, get_base_dir
from nanopipe.gpt import GPT, GPTConfig
from nanopipe.tokenizer import get_tokenizer

STEP_DIR = re.compile(r"^step_(\d{6,})$")
WEIGHTS = "model.safetensors"
LEGACY_WEIGHTS = "model.pt"  # written by nanopipe before safetensors; still read
PRODUCER = {"base": "python -m scripts.base_train", "sft": "python -m scripts.chat_sft"}


def checkpoint_root(source: str) -> Path:
    return get_base_dir() / "checkpoints" / source


def step_dir(checkpoint_dir, step: int) -> Path:
    return Path(checkpoint_dir) / f"step_{step:06d}"


def weights_file(path: Path) -> Path:
    """The weights of a step folder: model.safetensors, or model.pt in a checkpoint of an older version."""
    path = Path(path)
    return path / WEIGHTS if (path / WEIGHTS).is_file() or not (path / LEGACY_WEIGHTS).is_file() else \
        path / LEGACY_WEIGHTS


def _complete(path: Path) -> bool:
    return (path / "meta.json").is_file() and weights_file(path).is_file()


def list_steps(checkpoint_dir) -> list[int]:
    """Steps with a checkpoint folder, ascending. Folders only appear whole (renamed into place), so a part
    missing from one is damage, reported when it is opened, not a reason to fall back silently."""
    checkpoint_dir = Path(checkpoint_dir)
    if not checkpoint_dir.is_dir():
        return []
    steps = []
    for child in checkpoint_dir.iterdir():
        match = STEP_DIR.match(child.name)
        if match and child.is_dir():
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


def _state_bytes(obj) -> int:
    """Bytes of the tensors in a (nested) state dict: what a save of it needs on disk, about."""
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(_state_bytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(_state_bytes(v) for v in obj)
    return 0


def _remove_leftovers(checkpoint_dir: Path):
    """What a kill left in a tag's folder: temp, pruned and replaced step folders, and step folders without
    their meta or weights (a prune by an older version killed halfway). Only rank 0 of the one run on a tag
    writes here, so none of these can belong to a live save."""
    for child in checkpoint_dir.iterdir():
        if child.is_dir() and (child.name.startswith(".step_") or STEP_DIR.match(child.name) and not _complete(child)):
            shutil.rmtree(child)


def _remove_step(checkpoint_dir: Path, step: int):
    """Rename away first, then delete: a kill never leaves a half-deleted folder under a step's name."""
    path = step_dir(checkpoint_dir, step)
    doomed = checkpoint_dir / f".{path.name}.pruned"
    path.rename(doomed)
    shutil.rmtree(doomed)


def save_checkpoint(checkpoint_dir, step: int, model, optimizers, meta: dict, loader_state=None, rng=None,
                    keep_last: int = 2) -> Path:
    """Write step `step` of a run; every rank calls this (each saves its own loader/RNG state).

    `meta` must be json-able; model_config and step are added. Returns the step folder. The space it needs is
    checked first, and a full disk while writing removes the partial folder: earlier steps stay usable.
    """
    rank, world = _rank_world()
    checkpoint_dir = Path(checkpoint_dir)
    final = step_dir(checkpoint_dir, step)
    tmp = checkpoint_dir / f".{final.name}.tmp"
    weights = {k: v.detach().contiguous() for k, v in clean_state_dict(model.state_dict()).items()}
    optim_states = [opt.state_dict() for opt in optimizers]
    loader_and_rng = {"loader": loader_state, "rng": rng if rng is not None else rng_state()}
    needed = (_state_bytes(loader_and_rng) + (_state_bytes(weights) + _state_bytes(optim_states)) * (rank == 0)
              + (1 << 20))
    if rank == 0:
        checkpoint_dir.mkdir(parents=True, exist_ok=True)
        _remove_leftovers(checkpoint_dir)
        tmp.mkdir()
    _barrier()
    try:
        with disk_space(checkpoint_dir, needed, f"the checkpoint of step {step}"):
            torch.save(loader_and_rng, tmp / f"rank{rank}.pt")
            if rank == 0:
                safetensors.torch.save_file(weights, tmp / WEIGHTS)
                torch.save(optim_states, tmp / "optim.pt")
                meta = dict(meta, step=step, world_size=world, model_config=asdict(model.config))
                atomic_write_text(tmp / "meta.json", json.dumps(meta, indent=2) + "\n")
    except BaseException:
        if rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    _barrier()
    if rank == 0:
        if final.exists():  # re-saving a step: move the old one aside, so a kill leaves one or the other
            final.rename(checkpoint_dir / f".{final.name}.old")
        tmp.rename(final)
        shutil.rmtree(checkpoint_dir / f".{final.name}.old", ignore_errors=True)
        for old in list_steps(checkpoint_dir)[:-max(1, keep_last)]:
            _remove_step(checkpoint_dir, old)
    _barrier()
    return final


def _fallback(checkpoint_dir: Path, step: int) -> str:
    """What to do about a damaged step: fall back to the previous one, or start over."""
    earlier = [s for s in list_steps(checkpoint_dir) if s < step and _complete(step_dir(checkpoint_dir, s))]
    if earlier:
        return f"delete {step_dir(checkpoint_dir, step)} to fall back to step {earlier[-1]}"
    return f"delete {checkpoint_dir} to start fresh (or use another --model-tag)"


def read_meta(path: Path) -> dict:
    """meta.json of a step folder, checked for the fields every reader needs."""
    file = Path(path) / "meta.json"
    try:
        meta = json.loads(file.read_text(encoding="utf-8"))
        if not isinstance(meta, dict) or not isinstance(meta.get("model_config"), dict) or \
                not isinstance(meta.get("step"), int):
            raise ValueError("no step or model_config")
        GPTConfig(**meta["model_config"])
    except (OSError, UnicodeDecodeError, ValueError, TypeError) as e:
        raise _damaged(file, _reason(e)) from None
    return meta


def _step_of(path: Path) -> int:
    match = STEP_DIR.match(Path(path).name)
    return int(match.group(1)) if match else -1


def _reason(e: Exception) -> str:
    """A short account of why a file did not load (library messages run long)."""
    if isinstance(e, FileNotFoundError):
        return "missing"
    text = str(e)
    if "Weights only load failed" in text:
        return "it holds Python objects, not only tensors; refused without unpickling them"
    text = text.split(". ")[0].split("\n")[0]
    return f"{type(e).__name__}: {text[:100]}" if text else type(e).__name__


def _damaged(file: Path, reason: str) -> UserError:
    path = file.parent
    return UserError(f"cannot read {file} ({reason}): the checkpoint is damaged; "
                     f"{_fallback(path.parent, _step_of(path))}")


def load_weights(path: Path, device="cpu") -> dict:
    """The model state_dict of a step folder (safetensors, or an older version's model.pt), never unpickled."""
    file = weights_file(path)
    if not file.is_file():
        raise _damaged(file, "missing")
    try:
        if file.name == WEIGHTS:
            return safetensors.torch.load_file(file, device=str(device))
        state = torch.load(file, map_location=device, weights_only=True)
    except Exception as e:  # a truncated or foreign file: safetensors, zip and unpickler errors alike
        raise _damaged(file, _reason(e)) from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise _damaged(file, "not a state dict of tensors")
    return state


def check_weights(state_dict: dict, model, file: Path):
    """The saved weights must be exactly the model's parameters: same names, same shapes."""
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    saved = {k: tuple(v.shape) for k, v in clean_state_dict(state_dict).items()}
    if saved == expected:
        return
    missing = sorted(expected.keys() - saved.keys())
    extra = sorted(saved.keys() - expected.keys())
    shapes = [k for k in expected.keys() & saved.keys() if expected[k] != saved[k]]
    if missing or extra:
        what = f"{len(missing)} missing and {len(extra)} unknown tensors, e.g. {(missing or extra)[0]}"
    else:
        what = f"{shapes[0]} is {list(saved[shapes[0]])}, the model's is {list(expected[shapes[0]])}"
    raise _damaged(file, f"weights of another model shape than its meta.json says: {what}")


def _load_torch(file: Path, device):
    if not file.is_file():
        raise _damaged(file, "missing")
    try:
        return torch.load(file, map_location=device, weights_only=True)
    except Exception as e:  # truncated (zip) or garbage (unpickler), or an object weights_only refuses
        raise _damaged(file, _reason(e)) from None


def load_checkpoint(checkpoint_dir, step: int | None = None, device="cpu", rank: int = 0) -> dict:
    """{"step", "meta", "model", "optimizers", "loader", "rng"} of a saved step (the last one by default)."""
    checkpoint_dir = Path(checkpoint_dir)
    if step is None:
        step = find_last_step(checkpoint_dir)
        if step is None:
            raise UserError(f"no checkpoint in {checkpoint_dir}")
    path = step_dir(checkpoint_dir, step)
    if not path.is_dir():
        raise UserError(f"no checkpoint for step {step} in {checkpoint_dir} (have: {list_steps(checkpoint_dir)})")
    meta = read_meta(path)
    rank_file = path / f"rank{rank}.pt"
    if not rank_file.exists() and meta.get("world_size", 1) <= rank:
        raise UserError(f"{path} was saved by {meta.get('world_size', 1)} rank(s) and has no state for rank {rank}: "
                        "resume with the same number of processes")
    per_rank = _load_torch(rank_file, "cpu")
    if not isinstance(per_rank, dict) or not {"loader", "rng"} <= per_rank.keys() or \
            not isinstance(per_rank["rng"], dict) or not {"python", "numpy", "torch"} <= per_rank["rng"].keys():
        raise _damaged(rank_file, "no loader and RNG state in it")
    optimizers = _load_torch(path / "optim.pt", device)
    if not isinstance(optimizers, list) or not all(isinstance(o, dict) for o in optimizers):
        raise _damaged(path / "optim.pt", "not a list of optimizer states")
    return {
        "step": step,
        "meta": meta,
        "path": path,
        "model": load_weights(path, device),
        "optimizers": optimizers,
        "loader": per_rank["loader"],
        "rng": per_rank["rng"],
    }


def restore(ckpt: dict, model, optimizers):
    """Load a checkpoint's weights, optimizer states and RNG into a run, checking each against the run."""
    path = ckpt["path"]
    check_weights(ckpt["model"], model, weights_file(path))
    model.load_state_dict(clean_state_dict(ckpt["model"]))
    optim_file = path / "optim.pt"
    if len(ckpt["optimizers"]) != len(optimizers):
        raise _damaged(optim_file, f"{len(ckpt['optimizers'])} optimizer states for {len(optimizers)} optimizers")
    for opt, state in zip(optimizers, ckpt["optimizers"]):
        try:
            opt.load_state_dict(state)
        except (ValueError, KeyError, TypeError, RuntimeError) as e:
            raise _damaged(optim_file, _reason(e)) from None
        for group in opt.param_groups:
            for p in group["params"]:
                for key, value in opt.state.get(p, {}).items():
                    # moments have the parameter's shape, or 1 along a reduced dim (Muon); `step` is a scalar
                    if isinstance(value, torch.Tensor) and value.dim() and (value.dim() != p.dim() or any(
                            v not in (n, 1) for v, n in zip(value.shape, p.shape))):
                        raise _damaged(optim_file, f"optimizer state {key} of shape {list(value.shape)} for a "
                                                   f"parameter of shape {list(p.shape)}")
    try:
        set_rng_state(ckpt["rng"])
    except (ValueError, TypeError, KeyError, RuntimeError, AttributeError) as e:
        raise _damaged(path / f"rank{_rank_world()[0]}.pt", f"bad RNG state: {type(e).__name__}") from None


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


def default_tag(source: str) -> str:
    """The largest d<N> tag with a complete checkpoint (else the most recently written tag)."""
    root = checkpoint_root(source)
    tags = [p for p in root.iterdir() if p.is_dir() and list_steps(p)] if root.is_dir() else []
    if not tags:
        raise UserError(f"no {source} model in {root}: run `{PRODUCER[source]}` first")
    depth_tags = [p for p in tags if _depth_of(p.name) is not None]
    if depth_tags:
        return max(depth_tags, key=lambda p: _depth_of(p.name)).name
    return max(tags, key=lambda p: p.stat().st_mtime).name


def build_model_from_meta(meta: dict, state_dict: dict, device, file: Path | None = None) -> GPT:
    config = GPTConfig(**meta["model_config"])
    with torch.device("meta"):
        model = GPT(config)
    model.to_empty(device=device)
    model.init_weights()  # rebuilds the rotary tables; every parameter is then overwritten
    if file is not None:
        check_weights(state_dict, model, file)
    model.load_state_dict(clean_state_dict(state_dict), strict=True)
    return model


def load_model(source: str, tag: str | None = None, step: int | None = None, device="cpu"):
    """(model in eval mode, tokenizer, meta) of a saved base or sft model: the last step of the tag by default."""
    if source not in PRODUCER:
        raise ValueError(f"unknown model source {source!r}: use base or sft")
    tag = tag or default_tag(source)
    checkpoint_dir = checkpoint_root(source) / tag
    if not list_steps(checkpoint_dir):
        raise UserError(f"no {source} checkpoint in {checkpoint_dir}: run `{PRODUCER[source]}` "
                        f"(with --model-tag {tag}) first")
    if step is None:
        step = find_last_step(checkpoint_dir)
    path = step_dir(checkpoint_dir, step)
    if not path.is_dir():
        raise UserError(f"no checkpoint for step {step} in {checkpoint_dir}: "
                        f"available steps {list_steps(checkpoint_dir)}")
    meta = read_meta(path)
    model = build_model_from_meta(meta, load_weights(path, device), device, weights_file(path))
    model.eval()
    tokenizer = get_tokenizer()
    if tokenizer.vocab_size != model.config.vocab_size:
        raise UserError(f"the tokenizer in {get_base_dir() / 'tokenizer'} has {tokenizer.vocab_size} tokens but "
                        f"the model in {path} was trained with {model.config.vocab_size}: retrain the model or "
                        "restore its tokenizer")
    meta["checkpoint_dir"] = str(path)
    return model, tokenizer, meta
