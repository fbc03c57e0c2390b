"""
Generation speed of nanopipe.engine against baselines measured in the same run:
1. KV cache vs recomputing the whole sequence every step (greedy; asserts identical tokens);
2. N samples from one prompt in one batched call (one shared prefill) vs N separate calls.

    python -m bench.bench_engine [--depth 4] [--prompt-tokens 256] [--new-tokens 128] [--samples 4] [--threads N]

The model is a randomly initialised depth-N GPT (speed does not depend on what it knows).
"""

import argparse
import time

import torch

from nanopipe.engine import Engine
from nanopipe.gpt import build_model, config_from_depth
from tasks.world.documents import generate_documents
from nanopipe.tokenizer import Tokenizer


@torch.no_grad()
def greedy_without_cache(model, prompt, steps):
    ids = list(prompt)
    for _ in range(steps):
        ids.append(int(model(torch.tensor([ids]))[0, -1].argmax()))
    return ids[len(prompt):]


def timed(fn):
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--depth", type=int, default=4)
    parser.add_argument("--prompt-tokens", type=int, default=256)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--samples", type=int, default=4)
    parser.add_argument("--vocab-size", type=int, default=2048)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    tokenizer = Tokenizer.train(iter(list(generate_documents(0, 2000))), vocab_size=args.vocab_size)
    torch.manual_seed(0)
    config = config_from_depth(args.depth, tokenizer.vocab_size, max_seq_len=1024, head_dim=64)
    model = build_model(config, "cpu")
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    model.eval()
    text = " ".join(generate_documents(1, 50))
    prompt = tokenizer.encode(text, prepend=tokenizer.bos_token_id)[:args.prompt_tokens]
    # bos/assistant_end can never be sampled here, so every run generates exactly new_tokens tokens
    with torch.no_grad():
        model.lm_head.weight[tokenizer.bos_token_id] = 0
        model.lm_head.weight[tokenizer.encode_special("<|assistant_end|>")] = 0
    engine = Engine(model, tokenizer, use_tools=False)
    print(f"model: depth {args.depth}, {model.num_params() / 1e6:.1f}M params; prompt {len(prompt)} tokens, "
          f"{args.new_tokens} new tokens; torch threads {torch.get_num_threads()}")

    engine.generate_batch(prompt, max_tokens=4, temperature=0.0)  # warm up
    cached, t_cached = timed(lambda: engine.generate_batch(prompt, max_tokens=args.new_tokens, temperature=0.0))
    naive, t_naive = timed(lambda: greedy_without_cache(model, prompt, args.new_tokens))
    assert cached[0][len(prompt):] == naive, "KV-cache generation differs from recomputation"
    print(f"greedy, {args.new_tokens} tokens: no cache {t_naive:.2f}s, KV cache {t_cached:.2f}s "
          f"-> {t_naive / t_cached:.1f}x ({args.new_tokens / t_cached:.0f} tok/s)")

    n = args.samples
    _, t_separate = timed(lambda: [engine.generate_batch(prompt, max_tokens=args.new_tokens, temperature=1.0, seed=s)
                                   for s in range(n)])
    rows, t_shared = timed(lambda: engine.generate_batch(prompt, num_samples=n, max_tokens=args.new_tokens,
                                                              temperature=1.0, seed=0))
    assert all(len(r) == len(prompt) + args.new_tokens for r in rows)
    print(f"{n} samples: {n} separate calls {t_separate:.2f}s, one batched call {t_shared:.2f}s "
          f"-> {t_separate / t_shared:.1f}x ({n * args.new_tokens / t_shared:.0f} tok/s)")


if __name__ == "__main__":
    main()
