"""Recipe benchmark: base_train's default recipe vs a variant at equal tokens; val bpb of both and the ratio.

Both arms run `python -m scripts.base_train` on the same data, tokenizer and token budget (N steps of
batch x seq tokens), with each arm's own default LRs and schedules for that horizon, and report val bpb on
the first --eval-tokens tokens of the val shard. The variant is extra base_train flags, another source tree
(e.g. `git worktree add /tmp/old HEAD~3` for the recipe before a change), or both:

    python -m bench.bench_recipe --corpus ../shared/data/corpus                          # default only
    python -m bench.bench_recipe --corpus ../shared/data/corpus --variant-flags "--grad-clip 0"
    python -m bench.bench_recipe --corpus ../shared/data/corpus --variant-tree /tmp/old --steps 200 --depth 6

The corpus folder holds parquet shards with a `text` column, the last one being val (nanopipe's dataset
layout). A vocab-32768 tokenizer is trained on it once (scripts.tok_train, about a minute) and kept in
--work-dir with the results. Training is deterministic on CPU, so a result is reused when an arm's
source files, flags and thread count are unchanged (--fresh reruns it). That also splits a comparison too
long for one sitting: `--only variant` today, the same command without it tomorrow, which trains the default
and prints both with the stored variant. An arm checkpoints every 25 steps, so a killed arm (a closed laptop, an
ended session) continues from its last checkpoint when the same command is run again; base_train's exact
resume makes the result the same as an uninterrupted run's.
"""

import argparse
import hashlib
import json
import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

from nanopipe.cli import ArgumentParser
from nanopipe.sources import update_download_manifest

REPO = Path(__file__).resolve().parents[1]
# not part of a result's key: exact resume gives the same numbers with or without an interruption
RESUME_FLAGS = ["--save-every", "25", "--resume"]


def source_digest(tree: Path) -> str:
    """Hash of the Python sources a training run executes (nanopipe/ and scripts/)."""
    h = hashlib.sha256()
    for path in sorted([*tree.glob("nanopipe/*.py"), *tree.glob("scripts/*.py")]):
        h.update(path.relative_to(tree).as_posix().encode() + b"\0" + path.read_bytes() + b"\0")
    return h.hexdigest()[:16]


def child_env(tree: Path, base: Path, threads: int) -> dict:
    env = dict(os.environ, NANOPIPE_BASE_DIR=str(base), NANOPIPE_DATA="bench", NANOPIPE_DEVICE="cpu",
               NANOPIPE_REPORT_DIR=str(base / "report"), PYTHONPATH=str(tree),
               OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads), RAYON_NUM_THREADS=str(threads))
    env.pop("NANOPIPE_DTYPE", None)
    return env


def prepare_shared(work: Path, corpus: Path, threads: int) -> Path:
    """work/shared: data/bench -> the corpus shards, and a tokenizer trained on them (once)."""
    shared = work / "shared"
    data = shared / "data" / "bench"
    shards = sorted(corpus.glob("shard_*.parquet"))
    data.mkdir(parents=True, exist_ok=True)
    for shard in shards:
        link = data / shard.name
        if not link.exists():
            link.symlink_to(shard.resolve())
    if not (data / "manifest.json").exists():  # readers take exactly the shards a manifest lists
        update_download_manifest(data, {"kind": "bench_recipe", "corpus": str(corpus)}, val_file=shards[-1].name)
    if not (shared / "tokenizer").exists():
        print(f"training the vocab-32768 tokenizer on {corpus} ...", flush=True)
        subprocess.run([sys.executable, "-m", "scripts.tok_train", "--vocab-size", "32768"], cwd=REPO, check=True,
                       env=child_env(REPO, shared, threads))
    return shared


def train_flags(args) -> list[str]:
    return ["--depth", str(args.depth), "--head-dim", str(args.head_dim), "--max-seq-len", str(args.seq),
            "--device-batch-size", str(args.batch), "--total-batch-size", str(args.batch * args.seq),
            "--num-iterations", str(args.steps), "--eval-every", str(args.steps + 1),
            "--eval-tokens", str(args.eval_tokens), "--core-metric-every", "-1", "--sample-every", "-1",
            "--model-tag", "bench", "--device", "cpu"]


def run_arm(name: str, tree: Path, extra: list[str], args, work: Path, shared: Path) -> dict:
    """Train one arm in its own base dir (sharing data and tokenizer); its final val bpb and tok/s."""
    flags = train_flags(args) + extra
    key = hashlib.sha256(json.dumps([source_digest(tree), flags, args.threads]).encode()).hexdigest()[:16]
    cache = work / "results.json"
    results = json.loads(cache.read_text()) if cache.exists() else {}
    if key in results and not args.fresh:
        print(f"{name}: reusing the result of the same sources and flags ({key})", flush=True)
        return dict(results[key], cached=True)
    base = work / f"run_{key}"
    log = work / f"{name}_{key}.log"
    if args.fresh or not (base / "logs").exists():  # no run of this arm started yet: a fresh one
        shutil.rmtree(base, ignore_errors=True)
        base.mkdir(parents=True)
        for sub in ("data", "tokenizer"):
            (base / sub).symlink_to(shared / sub)
        log.unlink(missing_ok=True)
    print(f"{name}: {tree} base_train {shlex.join(extra) or '(defaults)'} (log {log})", flush=True)
    with open(log, "a") as f:
        code = subprocess.run([sys.executable, "-m", "scripts.base_train", *flags, *RESUME_FLAGS], cwd=tree,
                              stdout=f, stderr=subprocess.STDOUT, env=child_env(tree, base, args.threads)).returncode
    if code != 0:
        tail = "\n".join(log.read_text().splitlines()[-15:])
        sys.exit(f"error: the {name} arm failed (exit {code}), log {log}; last lines:\n{tail}")
    records = [json.loads(line) for line in (base / "logs" / "bench.jsonl").read_text().splitlines()]
    final = next(r for r in reversed(records) if r.get("final"))
    steps = [r for r in records if "dt" in r][1:]  # the first step pays for warmup
    result = {"val_bpb": final["val_bpb"], "train_seconds": sum(r["dt"] for r in records if "dt" in r),
              "tree": str(tree), "flags": extra,
              "tok_per_sec": sum(args.batch * args.seq for _ in steps) / sum(r["dt"] for r in steps) if steps else None}
    results = json.loads(cache.read_text()) if cache.exists() else {}
    results[key] = result
    cache.write_text(json.dumps(results, indent=1) + "\n")
    shutil.rmtree(base)  # checkpoints are large and only the numbers are wanted
    return result


def main():
    p = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--corpus", type=Path, required=True, help="folder of parquet shards (the last is val)")
    p.add_argument("--variant-flags", default="", help="extra base_train flags of the variant (one string)")
    p.add_argument("--variant-tree", type=Path, default=None,
                   help="source tree the variant runs from (default: this one)")
    p.add_argument("--depth", type=int, default=4)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--seq", type=int, default=512)
    p.add_argument("--batch", type=int, default=16, help="rows per step (one micro-batch)")
    p.add_argument("--steps", type=int, default=70)
    p.add_argument("--eval-tokens", type=int, default=131072, help="val tokens for bpb (from the val shard's start)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--work-dir", type=Path, default=Path.home() / ".cache" / "nanopipe" / "bench_recipe")
    p.add_argument("--fresh", action="store_true", help="retrain even when a result for the same run is stored")
    p.add_argument("--only", choices=["default", "variant"], default=None,
                   help="train one arm (its result is stored, so a later run of both reuses it)")
    args = p.parse_args()
    if not args.corpus.is_dir():
        p.error(f"--corpus {args.corpus} is not a folder: pass the folder of parquet shards")
    if len(list(args.corpus.glob("shard_*.parquet"))) < 2:
        p.error(f"--corpus {args.corpus} needs at least 2 shard_*.parquet files (train + the last as val)")
    if args.variant_tree is not None and not (args.variant_tree / "scripts" / "base_train.py").exists():
        p.error(f"--variant-tree {args.variant_tree} has no scripts/base_train.py: pass a nanopipe checkout")
    variant_flags = shlex.split(args.variant_flags)
    has_variant = bool(variant_flags) or args.variant_tree is not None
    if args.only == "variant" and not has_variant:
        p.error("--only variant needs the variant: give --variant-flags or --variant-tree")
    work = args.work_dir.expanduser().resolve()
    shared = prepare_shared(work, args.corpus.resolve(), args.threads)

    arms = {}
    if args.only != "variant":
        arms["default"] = run_arm("default", REPO, [], args, work, shared)
    if has_variant and args.only != "default":
        tree = (args.variant_tree or REPO).resolve()
        arms["variant"] = run_arm("variant", tree, variant_flags, args, work, shared)

    tokens = args.steps * args.batch * args.seq
    print(f"\ndepth {args.depth}, head dim {args.head_dim}, seq {args.seq}, {args.steps} steps x "
          f"{args.batch * args.seq:,} tokens = {tokens:,} tokens; val bpb on {args.eval_tokens:,} val tokens; "
          f"{args.threads} thread(s)")
    for name, r in arms.items():
        what = f"{r['tree']} {shlex.join(r['flags'])}".strip()
        speed = f"{r['tok_per_sec']:,.0f} tok/s" if r["tok_per_sec"] else "-"
        stored = "  (stored result)" if r.get("cached") else ""
        print(f"{name:8s} val bpb {r['val_bpb']:.4f}  {speed:>12s}  {what}{stored}")
    if len(arms) == 2:
        print(f"ratio variant/default val bpb: {arms['variant']['val_bpb'] / arms['default']['val_bpb']:.4f}")


if __name__ == "__main__":
    main()
