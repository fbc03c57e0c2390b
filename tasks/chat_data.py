"""The chat tasks' files: SFT and chat-eval datasets downloaded from the hub (pinned to one commit each), the
identity conversations and the spelling word list, under <base>/chat_data/<name>/.

    python -m scripts.dataset chat-data [--only gsm8k,mmlu]
"""

import json
import os
from pathlib import Path

from nanopipe.common import UserError, atomic_write_text, get_base_dir
from nanopipe.download import DownloadJob, HubFile, download_many, resolve_revision, retry_kwargs
from nanopipe.shards import verify_parquet

# name -> (HF dataset repo, parquet files in it); land in <base>/chat_data/<name>/<path>
CHAT_PARQUETS = {
    "smoltalk": ("HuggingFaceTB/smol-smoltalk", [*(f"data/train-{i:05d}-of-00004.parquet" for i in range(4)),
                                                 "data/test-00000-of-00001.parquet"]),
    "mmlu": ("cais/mmlu", ["auxiliary_train/train-00000-of-00001.parquet", "all/test-00000-of-00001.parquet"]),
    "gsm8k": ("openai/gsm8k", ["main/train-00000-of-00001.parquet", "main/test-00000-of-00001.parquet"]),
    "arc": ("allenai/ai2_arc", ["ARC-Easy/train-00000-of-00001.parquet", "ARC-Easy/test-00000-of-00001.parquet",
                                "ARC-Challenge/train-00000-of-00001.parquet",
                                "ARC-Challenge/test-00000-of-00001.parquet"]),
    "humaneval": ("openai/openai_humaneval", ["openai_humaneval/test-00000-of-00001.parquet"]),
}
# name -> (env var overriding the URL, default URL, file name); land in <base>/chat_data/<name>/<file>
CHAT_URLS = {
    "identity": ("NANOPIPE_IDENTITY_URL",
                 "https://karpathy-public.s3.us-west-2.amazonaws.com/identity_conversations.jsonl",
                 "identity_conversations.jsonl"),
    "words": ("NANOPIPE_WORDS_URL",
              "https://raw.githubusercontent.com/dwyl/english-words/refs/heads/master/words_alpha.txt",
              "words_alpha.txt"),
}
CHAT_DATA_NAMES = [*CHAT_PARQUETS, *CHAT_URLS]
CHAT_DATA_COMMAND = "python -m scripts.dataset chat-data"


def chat_data_dir() -> Path:
    return get_base_dir() / "chat_data"


def chat_data_file(name, path):
    """Path of a downloaded chat-data file (e.g. ("gsm8k", "main/test-00000-of-00001.parquet")); UserError if absent."""
    p = chat_data_dir() / name / path
    if not p.exists():
        raise UserError(f"missing {p}: run `{CHAT_DATA_COMMAND} --only {name}`")
    return p


def verify_jsonl(path):
    with open(path, encoding="utf-8") as f:
        rows = sum(1 for line in f if line.strip() and json.loads(line) is not None)
    if rows == 0:
        raise ValueError("no JSON lines")


def verify_nonempty_text(path):
    with open(path, encoding="utf-8") as f:
        if not f.read(4096).strip():
            raise ValueError("empty text file")


def chat_data_revision(name, repo, **retry_kwargs) -> str:
    """The commit of `repo` this chat dataset is pinned to: the one recorded at its first download, else main's
    commit now (recorded in chat_data/<name>/source.json once a file of it has landed)."""
    recorded = chat_data_dir() / name / "source.json"
    if recorded.is_file():
        source = json.loads(recorded.read_text())
        if source.get("repo") == repo and source.get("revision"):
            return source["revision"]
    return resolve_revision(repo, "main", **retry_kwargs)


def chat_data_jobs(names, **retry_kwargs):
    jobs = []
    for name in names:
        if name in CHAT_PARQUETS:
            repo, files = CHAT_PARQUETS[name]
            sha = chat_data_revision(name, repo, **retry_kwargs)
            jobs += [DownloadJob(hub.url, chat_data_dir() / name / f, verify_parquet, hub=hub)
                     for f, hub in ((f, HubFile(repo, f, sha)) for f in files)]
        else:
            env, url, filename = CHAT_URLS[name]
            verify = verify_jsonl if filename.endswith(".jsonl") else verify_nonempty_text
            jobs.append(DownloadJob(os.environ.get(env) or url, chat_data_dir() / name / filename, verify))
    return jobs


def download_chat_data(names=None, workers=4, **download_kwargs):
    names = names or CHAT_DATA_NAMES
    unknown = [n for n in names if n not in CHAT_DATA_NAMES]
    if unknown:
        raise UserError(f"--only {','.join(unknown)}: unknown; choose from {','.join(CHAT_DATA_NAMES)}")
    jobs = chat_data_jobs(names, **retry_kwargs(download_kwargs))
    summary = download_many(jobs, workers=workers, **download_kwargs)
    for job in jobs:  # pin each hub dataset to the commit its files came from
        recorded = chat_data_dir() / job.dest.relative_to(chat_data_dir()).parts[0] / "source.json"
        if job.hub is not None and job.dest.exists() and not recorded.exists():
            atomic_write_text(recorded, json.dumps({"repo": job.hub.repo_id, "revision": job.hub.revision}) + "\n")
    print(summary.format())
    return summary
