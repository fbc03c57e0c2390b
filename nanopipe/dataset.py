"""Moved: the dataset CLI is `python -m scripts.dataset`; the library parts are shards.py (reading),
shard_writer.py (writing), sources.py (downloads, local files), eval_bundle.py, and tasks/chat_data.py,
tasks/world/source.py. This stub names the new command for one release."""

import sys

if __name__ == "__main__":
    print("error: `python -m nanopipe.dataset` moved: run `python -m scripts.dataset " + " ".join(sys.argv[1:])
          + "` instead", file=sys.stderr)
    sys.exit(2)
