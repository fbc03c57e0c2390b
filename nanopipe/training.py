"""What the training stages (base_train, chat_sft) share: metric logging, schedules, guards, memory."""

import json
import math
import resource
from dataclasses import dataclass, fields
from pathlib import Path

import torch

from nanopipe.checkpoint import find_last_step, load_checkpoint, restore, step_dir
from nanopipe.common import UserError, atomic_write_text, disk_space, get_base_dir, print0


class MetricLog:
    """logs/<tag>.jsonl (rank 0), plus TensorBoard / wandb when asked for (optional extras).

    A fresh run starts a fresh log. A resumed one rewrites it to match its checkpoint: one line per step up
    to the checkpoint's step and none after (those steps are redone), no "final" line (the final evals are
    redone), and the checkpoint's step from the record saved in it (`log_record` in its meta.json) when a
    kill between the save and the log write lost that line.
    """

    def __init__(self, path: Path, resume_step: int, args, tag: str, enabled: bool, checkpoint_dir: Path = None):
        self.path = path
        self.enabled = enabled
        self.tb = self.wandb = None
        if not enabled:
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        kept = _log_at_checkpoint(read_log(path), resume_step, checkpoint_dir) if resume_step > 0 else []
        atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in kept))
        if getattr(args, "tensorboard", False):
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                raise UserError("--tensorboard needs the tensorboard package: pip install tensorboard") from None
            self.tb = SummaryWriter(str(get_base_dir() / "logs" / "tensorboard" / tag))
        if getattr(args, "wandb", None):
            try:
                import wandb
            except ImportError:
                raise UserError("--wandb needs the wandb package: pip install wandb (or drop --wandb)") from None
            self.wandb = wandb.init(project="nanopipe", name=args.wandb, config=vars(args), resume="allow")

    def write(self, record: dict):
        if not self.enabled:
            return
        line = json.dumps(record) + "\n"
        with disk_space(self.path.parent, len(line), f"the log line of step {record['step']}"):
            with open(self.path, "a") as f:
                f.write(line)
        numbers = {k: v for k, v in record.items() if isinstance(v, (int, float)) and not isinstance(v, bool)
                   and k != "step"}
        if self.tb is not None:
            for key, value in numbers.items():
                self.tb.add_scalar(key, value, record["step"])
            self.tb.flush()
        if self.wandb is not None:
            self.wandb.log(numbers, step=record["step"])

    def close(self):
        if self.tb is not None:
            self.tb.close()
        if self.wandb is not None:
            self.wandb.finish()


def valid_device_batch_sizes(total_batch: int, seq_len: int, world: int) -> list[int]:
    """The device batches (rows per micro-batch) whose micro-batches add up to total_batch tokens, ascending."""
    per_row = seq_len * world
    return [b for b in range(1, total_batch // per_row + 1) if total_batch % (b * per_row) == 0]


def _log_at_checkpoint(records: list[dict], step: int, checkpoint_dir: Path | None) -> list[dict]:
    """The log lines a run resumed from `step` keeps: each step < `step` once, then `step`'s own line."""
    by_step = {}
    for r in records:
        if not r.get("final") and r["step"] <= step:
            by_step.setdefault(r["step"], r)  # the first line of a step is the one its run wrote before dying
    if step not in by_step and checkpoint_dir is not None:
        try:
            saved = json.loads((step_dir(checkpoint_dir, step) / "meta.json").read_text()).get("log_record")
        except (OSError, ValueError):
            saved = None
        if isinstance(saved, dict):
            by_step[step] = saved
    return [by_step[s] for s in sorted(by_step)]


def read_log(path: Path) -> list[dict]:
    if not path.exists():
        return []
    records = []
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:  # a line cut by a kill
            continue
        if isinstance(record, dict) and isinstance(record.get("step"), int):
            records.append(record)
    return records


def series_from_log(records: list[dict], key: str, ylabel: str) -> dict:
    """A report series (x = step) of one logged metric."""
    points = [(r["step"], r[key]) for r in records if r.get(key) is not None]
    return {"x": [s for s, _ in points], "y": [v for _, v in points], "xlabel": "optimizer step", "ylabel": ylabel}


@dataclass
class LoopState:
    """What a training loop carries from step to step; saved in every checkpoint (meta.json "loop_state")."""
    smooth_loss: float = 0.0  # EMA (0.9) of the train loss, not yet debiased
    train_seconds: float = 0.0  # time in timed steps (each process's first step, with compilation, is not)
    timed_steps: int = 0  # steps counted in train_seconds

    def load(self, saved: dict):
        """Take the fields a checkpoint saved (meta.json's "loop_state" dict). A field it lacks keeps its
        default, so a checkpoint written before that field existed still resumes."""
        if not isinstance(saved, dict):
            raise TypeError("loop_state")
        for field in fields(self):
            if field.name in saved:
                setattr(self, field.name, saved[field.name])


def resume_training(checkpoint_dir: Path, resume: bool, model, optimizers, loop: LoopState, device, rank: int,
                    check_meta=None) -> tuple[int, object]:
    """Continue a run from its last checkpoint: model, optimizers, RNG and `loop` (updated in place).

    Returns (start step, dataloader state); (0, None) for a fresh run. Without --resume an existing checkpoint
    is refused rather than overwritten. `check_meta(meta)` raises UserError when the checkpoint was made by a
    different configuration (it names the flag).
    """
    last_step = find_last_step(checkpoint_dir)
    if last_step is None:
        if resume:
            print0(f"nothing to resume in {checkpoint_dir}: starting from step 0")
        return 0, None
    if not resume:
        raise UserError(f"{checkpoint_dir} already has a checkpoint at step {last_step}: pass --resume to continue "
                        f"it, or use another --model-tag (or delete that folder) to start over")
    ckpt = load_checkpoint(checkpoint_dir, last_step, device=device, rank=rank)
    meta_file = ckpt["path"] / "meta.json"
    try:
        if check_meta is not None:
            check_meta(ckpt["meta"])
        loop.load(ckpt["meta"]["loop_state"])
    except UserError as e:  # made by another configuration: name the checkpoint as well as the flag
        raise UserError(f"{meta_file}: {e}") from None
    except (KeyError, TypeError, ValueError) as e:
        raise UserError(f"cannot read {meta_file} (no {e} in it): the checkpoint is damaged or was written by "
                        f"another stage; delete {ckpt['path']} (or the whole {checkpoint_dir}) and rerun") from None
    restore(ckpt, model, optimizers)
    print0(f"resuming {checkpoint_dir} from step {last_step}")
    return last_step, ckpt["loader"]


def peak_memory_mb(device: str) -> float:
    if device == "cuda":
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def check_finite(step: int, loss: float, grad_norm: float, checkpoint_dir: Path, saved_step: int | None,
                 lr_flags: str):
    """Stop at the first non-finite loss or gradient, naming the step and the checkpoint that is still good."""
    if math.isfinite(loss) and math.isfinite(grad_norm):
        return
    where = (f"last good checkpoint: {step_dir(checkpoint_dir, saved_step)} (continue it with --resume)"
             if saved_step is not None else "no checkpoint was saved yet")
    raise UserError(f"training diverged at step {step}: loss {loss}, grad norm {grad_norm}; lower the LRs "
                    f"({lr_flags}) or check the data; {where}")
