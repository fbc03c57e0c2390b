"""Serve a trained model over HTTP: an OpenAI-compatible API and a web chat.

    python -m scripts.chat_serve                        # the SFT model on http://127.0.0.1:8000
    python -m scripts.chat_serve -i base --port 8080 --max-queue 32

Endpoints: POST /v1/chat/completions (stream true/false), GET /v1/models, GET /health, and the web chat at /.
Needs the `serve` extra (pip install -e '.[serve]'). It listens on 127.0.0.1 unless --host says otherwise:
there is no authentication, so expose it only behind something that adds it.
"""


from nanopipe import cli
from nanopipe.checkpoint import load_model
from nanopipe.common import autodetect_device, autodetect_dtype, require_extra
from nanopipe.stage import Stage


def parse_args(argv=None):
    p = cli.ArgumentParser(prog="python -m scripts.chat_serve", description=__doc__.split("\n")[0])
    p.add_argument("-i", "--source", choices=["sft", "base"], default="sft")
    p.add_argument("-g", "--model-tag", type=cli.name, default=None)
    p.add_argument("-s", "--step", type=cli.integer(0), default=None)
    p.add_argument("--device", default=None)
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: loopback only)")
    p.add_argument("--port", type=cli.integer(1, 65535), default=8000)
    p.add_argument("--max-queue", type=cli.integer(1), default=16, help="requests that may wait; more get 503")
    p.add_argument("--max-new-tokens", type=cli.integer(1), default=512, help="the most tokens one reply may have")
    p.add_argument("-t", "--temperature", type=cli.nonnegative(), default=0.6, help="when a request gives none")
    p.add_argument("-k", "--top-k", type=cli.integer(1), default=50, help="when a request gives none")
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    with Stage("chat_serve", args, report=False):
        require_extra("chat_serve", "serve", "fastapi", "uvicorn")
        import uvicorn

        from nanopipe.serve import create_app
        device = autodetect_device(args.device)
        model, tokenizer, meta = load_model(args.source, args.model_tag, args.step, device)
        name = f"nanopipe-{meta.get('tag', 'model')}-{args.source}"
        app = create_app(model, tokenizer, name, device=device, dtype=autodetect_dtype(device),
                         max_queue=args.max_queue, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                         top_k=args.top_k)
        print(f"serving {name} (step {meta.get('step')}) on http://{args.host}:{args.port}/", flush=True)
        uvicorn.run(app, host=args.host, port=args.port, log_level="warning")


if __name__ == "__main__":
    main()
