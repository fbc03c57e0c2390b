"""Build or fetch datasets: pretraining shards, the synthetic world, chat data, the CORE bundle.

    python -m scripts.dataset download fineweb-edu --num-shards 8     # 7 train shards + the val shard
    python -m scripts.dataset download fineweb-edu --num-shards 240 &  # background: shards appear one by one
    python -m scripts.dataset local --name mine textbooks/ web.jsonl --weights 70,30
    python -m scripts.dataset synthetic [--num-shards 6] [--seed 0]
    python -m scripts.dataset chat-data [--only gsm8k,mmlu]
    python -m scripts.dataset eval-bundle
    python -m scripts.dataset verify NAME                              # every shard against its manifest sha256

Downloads always include the source's final shard (fineweb-edu shard_01822) as the validation shard, and
fetch it first: the val set is then the same whatever --num-shards says, and a background download that
keeps adding train shards never changes which shard is val. Each shard lands atomically (verified, then
renamed), so a tokenizer started while the download runs in the background (`&` in the run script) only
ever sees complete shards.
"""

import argparse
import sys

from nanopipe import cli
from nanopipe.common import UserError
from nanopipe.download import DownloadError
from nanopipe.eval_bundle import download_eval_bundle
from nanopipe.shards import PRETRAIN_SOURCES, dataset_dir, list_shards
from nanopipe.sources import build_local, download_pretrain
from tasks.chat_data import CHAT_DATA_NAMES, download_chat_data
from tasks.world.source import DEFAULT_NUM_SHARDS, build_synthetic


def main(argv=None):
    parser = cli.ArgumentParser(prog="python -m scripts.dataset", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("download", help="download pretraining shards (FineWeb-Edu, ClimbMix)")
    p.add_argument("name", choices=sorted(PRETRAIN_SOURCES))
    p.add_argument("--num-shards", "-n", type=cli.integer(2), default=8, help="total shards incl. the val shard")
    p.add_argument("--workers", type=cli.integer(1, 256), default=4)
    p.add_argument("--revision", default=None,
                   help="branch, tag or commit of the source repo (default: main's commit at the first download)")
    p = sub.add_parser("local", help="build a dataset from your own .txt/.md/.jsonl/.parquet files or folders")
    p.add_argument("--name", type=cli.name, required=True)
    p.add_argument("paths", nargs="+")
    p.add_argument("--weights", type=cli.weights, default=None, help="mixture weights per path, e.g. 50,30,20")
    p.add_argument("--seed", type=cli.seed, default=0)
    p.add_argument("--docs-per-shard", type=cli.integer(1), default=50_000)
    p.add_argument("--val-every", type=cli.integer(2), default=100, help="every Nth document goes to the val shard")
    p = sub.add_parser("synthetic", help="generate the offline synthetic world")
    p.add_argument("--num-shards", "-n", type=cli.integer(2), default=None,
                   help=f"default: {DEFAULT_NUM_SHARDS}")
    p.add_argument("--seed", type=cli.seed, default=0)
    p.add_argument("--force", action="store_true", help="rebuild even if the same seed/shards exist")
    p = sub.add_parser("chat-data", help="download SFT and chat-eval data")
    p.add_argument("--only", type=cli.choices_list(CHAT_DATA_NAMES), default=None, help=",".join(CHAT_DATA_NAMES))
    p.add_argument("--workers", type=cli.integer(1, 256), default=4)
    sub.add_parser("eval-bundle", help="download the CORE eval bundle")
    p = sub.add_parser("verify", help="check every shard of a dataset against the sha256 in its manifest")
    p.add_argument("name", type=cli.name)
    args = parser.parse_args(argv)
    try:
        if args.command == "download":
            failed = download_pretrain(args.name, args.num_shards, args.workers, args.revision).failed
        elif args.command == "chat-data":
            failed = download_chat_data(args.only, args.workers).failed
        elif args.command == "local":
            build_local(args.name, args.paths, args.weights, args.seed, args.docs_per_shard, args.val_every)
            failed = []
        elif args.command == "synthetic":
            build_synthetic(args.num_shards, args.seed, args.force)
            failed = []
        elif args.command == "verify":
            train, _ = list_shards(args.name, check_sha256=True)
            print(f"{dataset_dir(args.name)}: {len(train)} train shard(s) and the val shard match their manifest")
            failed = []
        else:
            download_eval_bundle()
            failed = []
    except (UserError, DownloadError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
