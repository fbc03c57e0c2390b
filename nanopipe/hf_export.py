"""Export a trained model as a Hugging Face model folder, and push one to the hub.

    <out>/config.json                  NanopipeConfig: every architectural option spelled out, auto_map -> the module
    <out>/generation_config.json       stops at <|assistant_end|> or <|bos|>, like nanopipe's engine
    <out>/model.safetensors            nanopipe's state_dict as it is (fp32)
    <out>/modeling_nanopipe.py         nanopipe/hf_modeling.py: the trust_remote_code module
    <out>/gpt_layers.py                nanopipe/gpt_layers.py: the forward's pieces it shares with nanopipe's GPT
    <out>/tokenizer.json               nanopipe's BPE; special-token text is parsed as special tokens, and
                                       tokenizer(text) prepends <|bos|> as nanopipe does for documents
    <out>/tokenizer_config.json        special tokens and the chat template (nanopipe's rendering in Jinja)
    <out>/README.md                    the model card, filled from the run's report

transformers' built-in NanoChat class cannot hold these weights: it has no value embeddings, no per-layer
resid/x0 scalars, and rotates RoPE pairs the other way, so the export always ships its own module. The export
is checked before it is moved into place: the folder is loaded with transformers and its logits compared with
nanopipe's on the same tokens, so a model the module does not reproduce never leaves nanopipe.
"""

import dataclasses
import json
import shutil
import tempfile
from pathlib import Path

import torch

from nanopipe import gpt, report
from nanopipe.common import UserError, format_duration
from nanopipe.tokenizer import SPECIAL_TOKENS

MODULE_FILE = Path(__file__).with_name("hf_modeling.py")
LAYERS_FILE = Path(__file__).with_name("gpt_layers.py")  # imported by the module as .gpt_layers
# GPTConfig fields the module knows how to reproduce; a new field must be mapped in hf_config and hf_modeling
KNOWN_CONFIG_FIELDS = {"sequence_len", "vocab_size", "n_layer", "n_head", "n_kv_head", "n_embd", "rope_base",
                       "qk_scale", "ve_gate_channels", "smear_gate_channels"}
CHECK_TOLERANCE = 1e-4

# nanopipe's render_conversation in Jinja: <|bos|>, a leading system message merged into the first user turn
# with a blank line, user/assistant turns alternating, assistant content a string or a list of text / python /
# python_output parts. add_generation_prompt appends <|assistant_start|> (render_for_completion).
CHAT_TEMPLATE = "".join([
    "{%- set msgs = messages -%}",
    "{%- if msgs and msgs[0]['role'] == 'system' -%}",
    "{%- if msgs | length < 2 or msgs[1]['role'] != 'user' -%}",
    "{{ raise_exception('a system message must be followed by a user message') }}{%- endif -%}",
    "{%- set msgs = [{'role': 'user', 'content': msgs[0]['content'] + '\\n\\n' + msgs[1]['content']}] + msgs[2:] -%}",
    "{%- endif -%}",
    "<|bos|>",
    "{%- for m in msgs -%}",
    "{%- if m['role'] != ('user' if loop.index0 % 2 == 0 else 'assistant') -%}",
    "{{ raise_exception('roles must alternate user/assistant, user first (one optional system message first)') }}",
    "{%- endif -%}",
    "{%- if m['role'] == 'user' -%}<|user_start|>{{ m['content'] }}<|user_end|>",
    "{%- else -%}<|assistant_start|>",
    "{%- if m['content'] is string -%}{{ m['content'] }}",
    "{%- else -%}{%- for p in m['content'] -%}",
    "{%- if p['type'] == 'text' -%}{{ p['text'] }}",
    "{%- elif p['type'] == 'python' -%}<|python_start|>{{ p['text'] }}<|python_end|>",
    "{%- elif p['type'] == 'python_output' -%}<|output_start|>{{ p['text'] }}<|output_end|>",
    "{%- else -%}{{ raise_exception('assistant parts are text, python or python_output') }}{%- endif -%}",
    "{%- endfor -%}{%- endif -%}<|assistant_end|>",
    "{%- endif -%}",
    "{%- endfor -%}",
    "{%- if add_generation_prompt -%}<|assistant_start|>{%- endif -%}",
])


def hf_config(config: gpt.GPTConfig, tokenizer) -> dict:
    """config.json for a model of this GPTConfig: nanopipe's sizes plus the options gpt.py fixes in code."""
    unknown = {f.name for f in dataclasses.fields(config)} - KNOWN_CONFIG_FIELDS
    if unknown:
        raise RuntimeError(f"nanopipe's GPTConfig has fields the export does not reproduce: {sorted(unknown)}; "
                           "map them in nanopipe/hf_export.py and nanopipe/hf_modeling.py")
    special = {name: tokenizer.encode_special(name) for name in SPECIAL_TOKENS}
    return {
        "architectures": ["NanopipeForCausalLM"],
        "model_type": "nanopipe",
        "auto_map": {"AutoConfig": "modeling_nanopipe.NanopipeConfig",
                     "AutoModelForCausalLM": "modeling_nanopipe.NanopipeForCausalLM"},
        "vocab_size": config.vocab_size,
        "padded_vocab_size": gpt.padded_vocab_size(config.vocab_size),
        "n_layer": config.n_layer,
        "n_head": config.n_head,
        "n_kv_head": config.n_kv_head,
        "n_embd": config.n_embd,
        "sequence_len": config.sequence_len,
        "rope_base": config.rope_base,
        "logit_softcap": gpt.LOGIT_SOFTCAP,
        "value_embedding_layers": [i for i in range(config.n_layer) if gpt.has_value_embedding(i, config.n_layer)],
        "ve_gate_channels": min(config.ve_gate_channels, config.n_embd),
        "ve_gate_scale": 3.0,
        "x0_mixing": True,
        "mlp_ratio": 4,
        "qk_scale": config.qk_scale,
        "smear_gate_channels": min(config.smear_gate_channels, config.n_embd),
        "backout_layer": gpt.backout_layer(config.n_layer),
        "tie_word_embeddings": False,
        "bos_token_id": special["<|bos|>"],
        "eos_token_id": special["<|assistant_end|>"],
        "pad_token_id": special["<|bos|>"],
        "torch_dtype": "float32",
    }


def generation_config(tokenizer) -> dict:
    bos, end = tokenizer.bos_token_id, tokenizer.encode_special("<|assistant_end|>")
    return {"bos_token_id": bos, "eos_token_id": [end, bos], "pad_token_id": bos}


def tokenizer_files(tokenizer, sequence_len: int) -> tuple[str, dict]:
    """(tokenizer.json text, tokenizer_config.json) for transformers' PreTrainedTokenizerFast."""
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import processors
    hf = HFTokenizer.from_str(tokenizer.to_json())
    hf.encode_special_tokens = False  # the chat template's special tokens must become special ids
    bos = tokenizer.bos_token_id
    hf.post_processor = processors.TemplateProcessing(single="<|bos|> $A", pair="<|bos|> $A <|bos|> $B:1",
                                                      special_tokens=[("<|bos|>", bos)])
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": "<|bos|>",
        "eos_token": "<|assistant_end|>",
        "pad_token": "<|bos|>",
        "additional_special_tokens": [t for t in SPECIAL_TOKENS if t != "<|bos|>"],
        "model_max_length": sequence_len,
        "clean_up_tokenization_spaces": False,
        "chat_template": CHAT_TEMPLATE,
    }
    return hf.to_str(), config


def model_card(meta: dict, source: str, sections: dict) -> str:
    """README.md for the folder: what the model is and what the run's report measured."""
    config = meta.get("model_config", {})
    base_meta = meta
    if meta.get("base_checkpoint") and (Path(meta["base_checkpoint"]) / "meta.json").is_file():
        base_meta = json.loads((Path(meta["base_checkpoint"]) / "meta.json").read_text())
    train = sections.get("base_train", {})
    train_data, train_config = train.get("data", {}), train.get("config", {})
    base_eval = sections.get("base_eval", {}).get("data", {})
    chat_eval = sections.get("chat_eval_sft", {}).get("data", {})
    val_bpb = (base_eval.get("bpb") or {}).get("val", train_data.get("val_bpb"))
    rows = [
        ("model", f"nanopipe GPT, {source} checkpoint `{meta.get('tag', '?')}` step {meta.get('step', '?')}"),
        ("depth / width / heads", f"{config.get('n_layer')} / {config.get('n_embd')} / {config.get('n_head')}"),
        ("context", config.get("sequence_len")),
        ("vocabulary", config.get("vocab_size")),
        ("parameters", train_data.get("params")),
        ("pretraining data", base_meta.get("data") or train_config.get("data")),
        ("pretraining tokens", train_data.get("tokens")),
        ("pretraining steps", train_data.get("num_steps")),
        ("SFT mixture", meta.get("mixture") if source == "sft" else None),
        ("val bpb", val_bpb),
        (report.core_label(base_eval), base_eval.get("core")),
        ("ChatCORE", chat_eval.get("chatcore")),
    ]
    for name, task in (chat_eval.get("tasks") or {}).items():
        rows.append((f"{name} accuracy", task.get("accuracy")))
    seconds = sum(s.get("seconds") or 0 for s in sections.values())
    if seconds:
        rows.append(("pipeline wall time", format_duration(seconds)))
    table = "\n".join(f"| {k} | {report.fmt(v)} |" for k, v in rows)
    return f"""---
library_name: transformers
tags: [nanopipe, text-generation]
---

# nanopipe {meta.get('tag', '')} ({source})

A small chat model trained end to end with nanopipe (tokenizer, pretraining, SFT). The architecture is nanopipe's
GPT (value embeddings, per-layer residual scalars, QK-norm, ReLU² MLP, softcapped logits); the modelling code
ships in this folder, so load it with `trust_remote_code=True`.

| | |
|---|---|
{table}

Numbers are from the run's report (`report/report.md`); "—" means that stage did not run or did not report it.

```python
from transformers import AutoModelForCausalLM, AutoTokenizer
tok = AutoTokenizer.from_pretrained(DIR, trust_remote_code=True)
model = AutoModelForCausalLM.from_pretrained(DIR, trust_remote_code=True)
ids = tok.apply_chat_template([{{"role": "user", "content": "Hello!"}}], add_generation_prompt=True,
                              return_tensors="pt", return_dict=True)
out = model.generate(**ids, max_new_tokens=64, do_sample=False)
print(tok.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True))
```

The chat template renders conversations exactly as nanopipe does; calculator calls are assistant content parts
`{{"type": "python", "text": "2+3"}}` and their results `{{"type": "python_output", "text": "5"}}`. Plain
`tokenizer(text)` prepends `<|bos|>`, as the model saw every document in pretraining.
"""


def _write_folder(folder: Path, model, tokenizer, meta: dict, source: str, sections: dict):
    from safetensors.torch import save_file
    config = hf_config(model.config, tokenizer)
    (folder / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    (folder / "generation_config.json").write_text(json.dumps(generation_config(tokenizer), indent=2) + "\n")
    state = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
    shutil.copyfile(MODULE_FILE, folder / "modeling_nanopipe.py")
    shutil.copyfile(LAYERS_FILE, folder / LAYERS_FILE.name)
    tokenizer_json, tokenizer_config = tokenizer_files(tokenizer, model.config.sequence_len)
    (folder / "tokenizer.json").write_text(tokenizer_json)
    (folder / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=2) + "\n")
    (folder / "README.md").write_text(model_card(meta, source, sections))


def check_export(folder: Path, model, tokens: list[int]) -> float:
    """Load the folder with transformers, run both models on `tokens`; the largest logit difference.
    Raises RuntimeError if the parameters do not match name for name."""
    from transformers import AutoModelForCausalLM
    hf = AutoModelForCausalLM.from_pretrained(str(folder), trust_remote_code=True, dtype=torch.float32)
    ours = {k for k in model.state_dict()}
    theirs = {k for k in hf.state_dict()}
    if ours != theirs:
        raise RuntimeError(f"the exported module's parameters differ from nanopipe's: only nanopipe "
                           f"{sorted(ours - theirs)[:5]}, only the module {sorted(theirs - ours)[:5]}")
    hf.eval()
    device = next(model.parameters()).device
    idx = torch.tensor([tokens], dtype=torch.long)
    with torch.no_grad():
        expected = model.to("cpu")(idx).float()
        got = hf(idx).logits.float()
    model.to(device)
    return (expected - got).abs().max().item()


def export_model(model, tokenizer, meta: dict, source: str, out, overwrite: bool = False, check: bool = True) -> Path:
    """Write the folder for `model` into `out` (atomically: built beside it, checked, then renamed)."""
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not overwrite:
        raise UserError(f"--out {out} exists and is not empty: choose another folder or pass --overwrite")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.tmp-"))
    try:
        _write_folder(tmp, model, tokenizer, meta, source, report.read_sections())
        if check:
            tokens = tokenizer.encode("The export check reads a few ordinary words.", prepend=tokenizer.bos_token_id)
            tokens = tokens[:model.config.sequence_len]
            diff = check_export(tmp, model, tokens)
            if not diff <= CHECK_TOLERANCE:
                raise RuntimeError(f"the exported model's logits differ from nanopipe's by {diff:.3g} "
                                   f"(> {CHECK_TOLERANCE}): nanopipe/hf_modeling.py no longer matches nanopipe/gpt.py")
        if out.exists():
            shutil.rmtree(out) if out.is_dir() else out.unlink()
        tmp.chmod(0o755)  # mkdtemp made it private; the export is meant to be shared
        for f in tmp.iterdir():
            f.chmod(0o644)
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def hub_token() -> str:
    """The token pushes use: HF_TOKEN, else the one `hf auth login` stored."""
    from huggingface_hub import get_token
    token = get_token()
    if not token:
        raise UserError("--push-to-hub needs a Hugging Face token: set HF_TOKEN (a write token) or run `hf auth login`")
    return token


def push_to_hub(folder, repo: str, private: bool = False) -> str:
    """Upload the folder's files to the model repo `repo` (created if needed) in one commit; its URL.
    The host is HF_ENDPOINT (default the Hugging Face hub)."""
    from huggingface_hub import CommitOperationAdd, HfApi
    from huggingface_hub.errors import HfHubHTTPError
    api = HfApi(token=hub_token())
    files = sorted(p for p in Path(folder).iterdir() if p.is_file())
    try:
        api.create_repo(repo, private=private, exist_ok=True)
        info = api.create_commit(repo, operations=[CommitOperationAdd(f.name, str(f)) for f in files],
                                 commit_message="Upload a nanopipe model")
    except HfHubHTTPError as e:
        raise UserError(f"--push-to-hub {repo}: the hub answered {e}") from None
    return info.commit_url
