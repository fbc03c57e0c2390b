"""Chat with a trained model in the terminal.

    python -m scripts.chat_cli                    # the SFT model, interactive
    python -m scripts.chat_cli -p "What is 12*7?" # answer once and exit (scriptable)
    python -m scripts.chat_cli -i base -t 0.8 -k 50
    python -m scripts.chat_cli --demo -t 0          # the README's example prompts about the synthetic world

Commands: /clear starts a new conversation, /quit (or Ctrl-D) exits. Ctrl-C stops the answer being
written, not the program. Tool calls are shown as ⟦calc: expression → result⟧. When the conversation no
longer fits the model's context, the oldest turns are dropped.
"""

import sys

from nanopipe import cli
from nanopipe.checkpoint import load_model
from nanopipe.common import UserError, autocast, autodetect_device, autodetect_dtype
from nanopipe.engine import Engine, ReplyDecoder
from nanopipe.stage import Stage
from tasks.world.chat import DEMO_PROMPTS

def parse_args(argv=None):
    p = cli.ArgumentParser(prog="python -m scripts.chat_cli", description=__doc__.split("\n")[0])
    p.add_argument("-i", "--source", choices=["sft", "base"], default="sft")
    p.add_argument("-p", "--prompt", type=cli.utf8_text, default=None, help="answer this one prompt and exit")
    p.add_argument("--demo", action="store_true",
                   help="answer the synthetic world's example prompts (README), each in a new conversation, and exit")
    p.add_argument("-t", "--temperature", type=cli.nonnegative(), default=0.6, help="0: greedy")
    p.add_argument("-k", "--top-k", type=cli.integer(1), default=50)
    p.add_argument("--max-new-tokens", type=cli.integer(1), default=512)
    p.add_argument("-g", "--model-tag", type=cli.name, default=None)
    p.add_argument("-s", "--step", type=cli.integer(0), default=None)
    p.add_argument("--device", default=None)
    p.add_argument("--seed", type=cli.seed, default=42)
    return p.parse_args(argv)


def fit_to_context(tokenizer, messages: list[dict], budget: int) -> tuple[list[dict], list[int]]:
    """Drop the oldest user/assistant pairs until the prompt leaves `budget` tokens free; returns both."""
    while True:
        prompt = tokenizer.render_for_completion({"messages": messages + [{"role": "assistant", "content": ""}]})
        if len(prompt) <= budget or len(messages) <= 1:
            return messages, prompt[-budget:]
        messages = messages[2:]


class ChatSession:
    def __init__(self, model, tokenizer, temperature: float, top_k: int, max_new_tokens: int, seed: int):
        self.engine = Engine(model, tokenizer)
        self.tokenizer = tokenizer
        self.context = model.config.sequence_len
        self.sampling = dict(temperature=temperature, top_k=top_k)
        self.max_new_tokens = max_new_tokens
        self.seed = seed
        self.messages: list[dict] = []

    def clear(self):
        self.messages = []

    def answer(self, text: str, write=sys.stdout.write):
        """Stream the reply to `text` through `write`; the reply (tool calls as parts) joins the history."""
        self.messages.append({"role": "user", "content": text})
        self.messages, prompt = fit_to_context(self.tokenizer, self.messages,
                                               max(1, self.context - min(self.max_new_tokens, self.context // 2)))
        max_tokens = max(1, self.context - len(prompt))
        decoder = ReplyDecoder(self.tokenizer)
        self.seed += 1
        try:
            for step in self.engine.generate(prompt, max_tokens=min(max_tokens, self.max_new_tokens),
                                             seed=self.seed, **self.sampling):
                token, _ = step[0]
                if token is None or token in self.engine.stop_tokens:
                    break
                write(decoder.feed(token))
                sys.stdout.flush()
        except KeyboardInterrupt:
            write("  [stopped]")
        write(decoder.flush() + "\n")
        parts = decoder.finish()  # the reply as conversation content: text, plus python / python_output parts
        if all(p["type"] == "text" for p in parts):
            parts = "".join(p["text"] for p in parts)
        self.messages.append({"role": "assistant", "content": parts})


def read_line(prompt: str) -> str:
    """A line of the user's input; bytes that are not UTF-8 (strict, or surrogate-escaped by a C locale) are refused."""
    try:
        text = input(prompt)
        text.encode("utf-8")
    except (UnicodeDecodeError, UnicodeEncodeError):
        raise UserError("the input is not UTF-8 text: use a UTF-8 terminal or locale (e.g. LANG=C.UTF-8)") from None
    return text.strip()


def main(argv=None):
    args = parse_args(argv)
    with Stage("chat_cli", args, report=False):
        device = autodetect_device(args.device)
        dtype = autodetect_dtype(device)
        model, tokenizer, meta = load_model(args.source, args.model_tag, args.step, device)
        model.eval()
        session = ChatSession(model, tokenizer, args.temperature, args.top_k, args.max_new_tokens, args.seed)
        with autocast(device, dtype):
            if args.prompt is not None:
                session.answer(args.prompt)
                return
            if args.demo:
                for prompt, _ in DEMO_PROMPTS:
                    session.clear()
                    sys.stdout.write(f"you> {prompt}\nbot> ")
                    session.answer(prompt)
                return
            try:
                import readline  # noqa: F401  (line editing and history for input())
            except ImportError:
                pass
            print(f"nanopipe chat ({args.source} model {meta.get('tag', '')}, step {meta.get('step')}). "
                  "/clear: new conversation, /quit: exit, Ctrl-C: stop an answer.")
            while True:
                try:
                    text = read_line("\nyou> ")
                except (EOFError, KeyboardInterrupt):
                    print()
                    return
                if text in ("/quit", "/exit"):
                    return
                if text == "/clear":
                    session.clear()
                    print("(new conversation)")
                    continue
                if text:
                    sys.stdout.write("bot> ")
                    session.answer(text)


if __name__ == "__main__":
    main()
