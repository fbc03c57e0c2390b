"""
Measure the tokenizer's compression (bytes of UTF-8 text per token) on the dataset's validation split and on
a few kinds of text carried here (prose, code, math, numbers, other languages).

    python -m scripts.tok_eval [--data NAME] [--max-chars 20000000]

GPT-2 and GPT-4 (cl100k) encodings are compared too when they can be loaded without the network: tiktoken
with its cached files, or tokenizer.json files already in the Hugging Face cache. Otherwise the report says so.
"""

import hashlib
import os
import tempfile
from pathlib import Path

from nanopipe import cli
from nanopipe.common import print0
from nanopipe.shards import iter_documents
from nanopipe.stage import Stage
from nanopipe.tokenizer import get_tokenizer
from tasks.profile import default_data_name

# Written for this file. Each sample is one kind of text a chat model meets.
SAMPLES = {
    "prose": (
        "The lighthouse keeper kept a notebook of every ship that passed. Most entries were short: a name, a "
        "direction, the state of the sea. On stormy nights he wrote more, describing how the beam swept across "
        "the waves and how the gulls sheltered under the gallery rail. Years later his granddaughter found the "
        "notebooks in a tin box and read them aloud, one winter evening at a time, until the whole family knew "
        "the names of boats that had long since been broken up for scrap."
    ),
    "code": (
        "def moving_average(values, window):\n"
        "    \"\"\"Mean of each run of `window` consecutive values.\"\"\"\n"
        "    if window <= 0:\n"
        "        raise ValueError(f\"window must be positive, got {window}\")\n"
        "    total = sum(values[:window])\n"
        "    out = [total / window]\n"
        "    for i in range(window, len(values)):\n"
        "        total += values[i] - values[i - window]\n"
        "        out.append(total / window)\n"
        "    return out\n\n\n"
        "class Inventory:\n"
        "    def __init__(self):\n"
        "        self.items: dict[str, int] = {}\n\n"
        "    def add(self, name: str, count: int = 1) -> None:\n"
        "        self.items[name] = self.items.get(name, 0) + count\n"
    ),
    "math": (
        "Let f(x) = 3x^2 - 12x + 7. Completing the square gives f(x) = 3(x - 2)^2 - 5, so the minimum is -5 at "
        "x = 2. The roots satisfy (x - 2)^2 = 5/3, that is x = 2 ± √(5/3) ≈ 2 ± 1.291. For the integral, "
        "∫₀¹ f(x) dx = [x³ - 6x² + 7x]₀¹ = 1 - 6 + 7 = 2. If a_n = 1/n², the series Σ a_n converges to π²/6."
    ),
    "numbers": (
        "Order 40213 shipped on 2024-03-17 at 14:05:59 with 12 boxes weighing 318.75 kg in total. Invoice "
        "#INV-0098123: subtotal $12,480.00, tax 8.25% = $1,029.60, total $13,509.60. Phone +1 (555) 010-2233. "
        "Coordinates 48.8566, 2.3522; elevation 35 m. Serial numbers 7731-0042-9981, 7731-0042-9982."
    ),
    "non-english": (
        "Der Zug nach Hamburg hatte heute zwanzig Minuten Verspätung, weil ein Baum auf den Gleisen lag. "
        "Nous avons pique-niqué au bord de la rivière, puis nous sommes rentrés à vélo avant la pluie. "
        "El museo abre a las diez y la entrada es gratuita los domingos por la tarde. "
        "Летом мы часто ездим на дачу, где бабушка выращивает огурцы и клубнику. "
        "我每天早上骑自行车去上班，路上大约需要二十分钟。 "
        "新しいカメラを買ったので、週末は海辺で写真を撮るつもりです。 "
        "도서관은 오후 여섯 시에 문을 닫으니 서둘러야 해요."
    ),
}

TIKTOKEN_FILES = {  # tiktoken encoding -> the file it would download (its cache is keyed by this url)
    "gpt2": "https://openaipublic.blob.core.windows.net/gpt-2/encodings/main/vocab.bpe",
    "cl100k_base": "https://openaipublic.blob.core.windows.net/encodings/cl100k_base.tiktoken",
}
HF_TOKENIZERS = {"gpt2": "openai-community/gpt2", "cl100k_base": "Xenova/gpt-4"}  # tokenizer.json repos


def parse_args(argv=None):
    parser = cli.ArgumentParser(prog="python -m scripts.tok_eval", description=__doc__.strip().split("\n\n")[0])
    parser.add_argument("--data", type=cli.name, default=None,
                        help="dataset name (default: $NANOPIPE_DATA or fineweb-edu)")
    parser.add_argument("--max-chars", type=cli.integer(1), default=20_000_000, help="validation characters to measure")
    return parser.parse_args(argv)


def _tiktoken_cached(encoding: str) -> bool:
    cache = os.environ.get("TIKTOKEN_CACHE_DIR") or os.environ.get("DATA_GYM_CACHE_DIR") or \
        os.path.join(tempfile.gettempdir(), "data-gym-cache")
    return (Path(cache) / hashlib.sha1(TIKTOKEN_FILES[encoding].encode()).hexdigest()).exists()


def offline_baseline(encoding: str):
    """An encode function (str -> list of ids) for a reference encoding, or (None, why not) without network."""
    try:
        import tiktoken
        if _tiktoken_cached(encoding):
            enc = tiktoken.get_encoding(encoding)
            return (lambda text: enc.encode(text, disallowed_special=())), "tiktoken"
    except ImportError:
        pass
    try:
        from huggingface_hub import hf_hub_download
        from tokenizers import Tokenizer as HFTokenizer
        path = hf_hub_download(HF_TOKENIZERS[encoding], "tokenizer.json", local_files_only=True)
        hf = HFTokenizer.from_file(path)
        return (lambda text: hf.encode(text, add_special_tokens=False).ids), "hf cache"
    except Exception:  # not installed, or not in the cache: both mean "not available offline"
        return None, "not cached locally (tiktoken or Hugging Face cache)"


def validation_text(name, max_chars):
    docs, chars = [], 0
    for text, _ in iter_documents(name, "val"):
        docs.append(text)
        chars += len(text)
        if chars >= max_chars:
            break
    return docs


def main(argv=None):
    args = parse_args(argv)
    with Stage("tok_eval", args) as stage:
        tokenizer = get_tokenizer()
        name = default_data_name(args.data)
        texts = {f"{name} val": validation_text(name, args.max_chars)}
        texts.update({kind: [text] for kind, text in SAMPLES.items()})

        counters = {"ours": lambda docs: sum(map(len, tokenizer.encode(docs)))}  # label -> docs -> token count
        missing = {}
        for label, encoding in (("GPT-2", "gpt2"), ("GPT-4", "cl100k_base")):
            encode, source = offline_baseline(encoding)
            if encode is None:
                missing[label] = source
            else:
                counters[label] = lambda docs, encode=encode: sum(len(encode(d)) for d in docs)

        results = {}  # text kind -> {"bytes": n, label: tokens, ...}
        for kind, docs in texts.items():
            row = {"bytes": sum(len(d.encode("utf-8")) for d in docs)}
            for label, count in counters.items():
                row[label] = count(docs)
            results[kind] = row

        labels = list(counters)
        header = "| text | bytes | " + " | ".join(f"{label} tokens | {label} bytes/token" for label in labels) + " |"
        lines = [header, "|" + "---|" * (2 + 2 * len(labels))]
        for kind, row in results.items():
            cells = " | ".join(f"{row[label]:,} | {row['bytes'] / max(row[label], 1):.2f}" for label in labels)
            lines.append(f"| {kind} | {row['bytes']:,} | {cells} |")
        md = f"vocab size {tokenizer.vocab_size:,}; higher bytes/token = better compression.\n\n" + "\n".join(lines)
        if missing:
            md += "\n\n" + "; ".join(f"{label}: {why}" for label, why in missing.items()) + \
                  " — only our tokenizer is shown for those."
        print0(md)

        data = {"vocab_size": tokenizer.vocab_size, "data": name,
                "bytes_per_token": {kind: {label: round(row["bytes"] / max(row[label], 1), 4) for label in labels}
                                    for kind, row in results.items()},
                "val_bytes_per_token": round(results[f"{name} val"]["bytes"]
                                             / max(results[f"{name} val"]["ours"], 1), 4),
                "baselines_missing": missing}
        stage.report(md, data)


if __name__ == "__main__":
    main()
