"""Export a trained model as a Hugging Face model folder (and optionally push it to the hub).

    python -m scripts.export -i sft --out exported/d12
    python -m scripts.export -i base -g d12 --step 2000 --out exported/d12-base
    python -m scripts.export -i sft --out exported/d12 --push-to-hub you/nanopipe-d12    # token: HF_TOKEN

Load it anywhere with AutoModelForCausalLM.from_pretrained(DIR, trust_remote_code=True). Needs the `hf` extra
(pip install -e '.[hf]').
"""

from pathlib import Path

from nanopipe import cli
from nanopipe.checkpoint import load_model
from nanopipe.common import require_extra
from nanopipe.stage import Stage


def parse_args(argv=None):
    p = cli.ArgumentParser(prog="python -m scripts.export", description=__doc__.split("\n")[0])
    p.add_argument("-i", "--source", choices=["sft", "base"], default="sft", help="which model to export")
    p.add_argument("-g", "--model-tag", type=cli.name, default=None, help="checkpoint tag (default: the largest d<N>)")
    p.add_argument("-s", "--step", type=cli.integer(0), default=None, help="checkpoint step (default: the last)")
    p.add_argument("--out", required=True, help="the folder to write (must not exist or be empty)")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    p.add_argument("--push-to-hub", metavar="REPO", default=None, help="also upload the folder to this hub repo")
    p.add_argument("--private", action="store_true", help="create the hub repo as private")
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    with Stage("export", args, report=False):
        require_extra("export", "hf", "safetensors", "transformers")
        from nanopipe.hf_export import export_model, hub_token, push_to_hub
        if args.push_to_hub:
            hub_token()  # no token: say so before spending time on the export
        model, tokenizer, meta = load_model(args.source, args.model_tag, args.step, "cpu")
        meta.setdefault("tag", Path(meta["checkpoint_dir"]).parent.name)
        out = export_model(model, tokenizer, meta, args.source, args.out, overwrite=args.overwrite)
        print(f"exported {args.source} model {meta['tag']} step {meta['step']} to {out}")
        if args.push_to_hub:
            print(f"pushed: {push_to_hub(out, args.push_to_hub, private=args.private)}")


if __name__ == "__main__":
    main()
