"""
Inference with the KV cache and the calculator tool.

The prompt is run once (prefill) into a batch-1 cache, which is copied into every row of an N-row decode
cache, so N samples of one prompt share the prefill; then each step feeds one token per row. Temperature 0
is greedy; top_k keeps the k most likely tokens. A row ends at <|assistant_end|> or <|bos|>.

Tool use: tokens a row produces between <|python_start|> and <|python_end|> are decoded and handed to
`calculate`; when it returns a result, <|output_start|> result <|output_end|> is forced into that row on the
following steps instead of sampled tokens (the model never has to predict tool output). `use_tools=False`
turns this off, for measuring what the calculator is worth.

`ReplyDecoder` turns a reply's tokens into what a person sees (calculator calls as ⟦calc: expression → result⟧,
multi-byte characters only once complete) and into conversation parts; the CLI and the server share it.

`greedy_samples` continues a few fixed prompts greedily: the quick look at a base model that base_train and
base_eval print and report.

On CUDA, callers run generation under bf16 autocast like the rest of inference; the cache then stores bf16.
"""

import re

import torch
import torch.nn.functional as F

from nanopipe.calculator import calculate
from nanopipe.gpt import KVCache


def sample_next(logits: torch.Tensor, temperature: float, top_k: int | None, generator) -> torch.Tensor:
    """One token per row of logits (N, V): argmax at temperature 0, else softmax sampling (top-k if given)."""
    if temperature <= 0:
        return logits.argmax(dim=-1)
    logits = logits.float()
    if top_k is not None and top_k < logits.size(-1):
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = F.softmax(logits / temperature, dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


class RowState:
    """Per-sample bookkeeping: the tool state machine and the queue of tokens to force."""

    def __init__(self):
        self.forced = []          # tokens to emit next instead of sampling
        self.in_python = False
        self.expression = []      # tokens since <|python_start|>
        self.done = False


class Engine:
    def __init__(self, model, tokenizer, use_tools: bool = True):
        self.model = model
        self.tokenizer = tokenizer
        self.use_tools = use_tools
        special = tokenizer.encode_special
        self.python_start, self.python_end = special("<|python_start|>"), special("<|python_end|>")
        self.output_start, self.output_end = special("<|output_start|>"), special("<|output_end|>")
        self.stop_tokens = {special("<|assistant_end|>"), tokenizer.bos_token_id}

    def _cache(self, batch_size: int, max_len: int, device) -> KVCache:
        dtype = torch.bfloat16 if device.type == "cuda" and torch.is_autocast_enabled("cuda") else torch.float32
        return KVCache(batch_size, max_len, self.model.config, device=device, dtype=dtype)

    def _advance(self, row: RowState, token: int):
        """Run the tool state machine on the token a row just produced."""
        if token in self.stop_tokens:
            row.done = True
        elif token == self.python_start:
            row.in_python, row.expression = True, []
        elif token == self.python_end and row.in_python:
            row.in_python = False
            if self.use_tools:
                result = calculate(self.tokenizer.decode(row.expression))
                if result is not None:
                    row.forced.extend([self.output_start, *self.tokenizer.encode(result), self.output_end])
        elif row.in_python:
            row.expression.append(token)

    @torch.no_grad()
    def generate(self, tokens: list[int], num_samples: int = 1, max_tokens: int | None = None,
                 temperature: float = 1.0, top_k: int | None = None, seed: int = 42):
        """Stream a continuation of the prompt `tokens` for num_samples rows.

        Yields once per step a list with one (token_id, was_forced) pair per row; a row that has ended (its
        last pair carried <|assistant_end|> or <|bos|>) yields (None, False) until every row has ended or
        max_tokens steps have run. max_tokens defaults to what fits in the model's sequence length.
        """
        if not tokens:
            raise ValueError("generate needs a non-empty prompt (at least <|bos|>)")
        model = self.model
        device = model.lm_head.weight.device
        if max_tokens is None:
            max_tokens = max(1, model.config.sequence_len - len(tokens))
        generator = torch.Generator(device=device).manual_seed(seed)
        was_training = model.training
        model.eval()
        try:
            prefill = self._cache(1, len(tokens), device)
            logits = model(torch.tensor([tokens], dtype=torch.long, device=device), kv_cache=prefill)[:, -1]
            cache = self._cache(num_samples, len(tokens) + max_tokens, device)
            cache.expand_from(prefill)
            del prefill
            logits = logits.expand(num_samples, -1)
            rows = [RowState() for _ in range(num_samples)]
            for step in range(max_tokens):
                sampled = sample_next(logits, temperature, top_k, generator).tolist()
                out = []
                for row, token in zip(rows, sampled):
                    if row.done:
                        out.append((None, False))
                        continue
                    forced = bool(row.forced)
                    if forced:
                        token = row.forced.pop(0)
                    self._advance(row, token)
                    out.append((token, forced))
                yield out
                if all(row.done for row in rows) or step == max_tokens - 1:
                    break
                # finished rows still need some input to keep the batch rectangular; their output is ignored
                feed = [token if token is not None else self.tokenizer.bos_token_id for token, _ in out]
                logits = model(torch.tensor(feed, dtype=torch.long, device=device)[:, None], kv_cache=cache)[:, -1]
        finally:
            model.train(was_training)

    def generate_batch(self, tokens: list[int], num_samples: int = 1, max_tokens: int | None = None,
                       temperature: float = 1.0, top_k: int | None = None, seed: int = 42):
        """Run generate() to the end: one sequence per row, the prompt plus the generated tokens (the stop
        token excluded)."""
        sequences = [list(tokens) for _ in range(num_samples)]
        for step in self.generate(tokens, num_samples, max_tokens, temperature, top_k, seed):
            for i, (token, _) in enumerate(step):
                if token is None or token in self.stop_tokens:
                    continue
                sequences[i].append(token)
        return sequences


def greedy_samples(model, tokenizer, prompts: list[str], max_tokens: int = 16) -> list[str]:
    """Each prompt followed by its greedy continuation (at most max_tokens tokens, ending early at <|bos|> or
    <|assistant_end|>), decoded: what a base model has learned, at a glance."""
    engine = Engine(model, tokenizer)
    samples = []
    for prompt in prompts:
        ids = tokenizer.encode(prompt, prepend=tokenizer.bos_token_id)
        sequences = engine.generate_batch(ids, max_tokens=max_tokens, temperature=0.0)
        samples.append(tokenizer.decode(sequences[0][1:]))  # the prompt and the continuation, without <|bos|>
    return samples


# how a reply's calculator calls are shown to a person (chat_cli, chat_serve, the web chat)
TOOL_MARKS = {"<|python_start|>": "⟦calc: ", "<|python_end|>": "",
              "<|output_start|>": " → ", "<|output_end|>": "⟧"}
PART_STARTS = {"<|python_start|>": "python", "<|output_start|>": "python_output"}


# GSM8K-style final-answer line ("\n#### 72"): the evaluator reads it, a person is not shown it
ANSWER_MARKER = re.compile(r"\n?####[^\n]*")
# the end of a text that may still grow into a marker: held back until the next token decides
_MARKER_START = re.compile(r"\n?#{0,3}$")


class ReplyDecoder:
    """Turns a reply's tokens, one at a time, into the text to show (tool calls marked, the `####` answer line
    hidden) and into parts (the reply as the model wrote it, marker included)."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.marks = {tokenizer.encode_special(name): text for name, text in TOOL_MARKS.items()}
        self.starts = {tokenizer.encode_special(name): kind for name, kind in PART_STARTS.items()}
        self.parts, self.kind, self.run, self.shown = [], "text", [], ""

    def _visible(self, final: bool) -> str:
        text = self.tokenizer.decode(self.run)
        if self.kind != "text":
            return text
        text = ANSWER_MARKER.sub("", text)
        return text if final else text[:_MARKER_START.search(text).start()]

    def _new_text(self, final: bool) -> str:
        text = self._visible(final)
        new = text[len(self.shown):] if text.startswith(self.shown) else ""
        self.shown = text
        return new

    def _close_run(self):
        if self.run:
            self.parts.append({"type": self.kind, "text": self.tokenizer.decode(self.run)})
        self.run, self.shown = [], ""

    def feed(self, token: int) -> str:
        """The new visible text after `token` ("" while a multi-byte character or a possible marker is incomplete)."""
        if token in self.marks:
            held = self._new_text(final=True)
            self._close_run()
            self.kind = self.starts.get(token, "text")  # an end token returns to text
            return held + self.marks[token]
        self.run.append(token)
        if self.tokenizer.decode(self.run).endswith("\ufffd"):
            return ""
        return self._new_text(final=False)

    def flush(self) -> str:
        """What feed held back at the end of the reply (an incomplete character is shown as U+FFFD)."""
        return self._new_text(final=True)

    def finish(self) -> list[dict]:
        """The reply as conversation content parts (text / python / python_output), empty runs left out."""
        self._close_run()
        return self.parts
