"""The Hugging Face export: a tiny trained model exported, loaded back with transformers, compared with nanopipe."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from nanopipe import report
from nanopipe.checkpoint import load_model
from nanopipe.engine import Engine
from nanopipe.hf_export import CHECK_TOLERANCE, check_export, export_model
from scripts import export
from tests.conftest import subprocess_env
from tests.hub_server import HubServer

transformers = pytest.importorskip("transformers", reason="the export tests need the hf extra: pip install -e '.[hf]'")

CONVERSATIONS = [
    {"messages": [{"role": "user", "content": "What is the capital of Varnel?"}]},
    {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"},
                  {"role": "assistant", "content": "Hello! How can I help?"},
                  {"role": "user", "content": "What is 12*7? Use  two  spaces\nand a newline."}]},
    {"messages": [{"role": "user", "content": "What is 3 + 4 times 2?"},
                  {"role": "assistant", "content": [{"type": "text", "text": "Let me compute. "},
                                                    {"type": "python", "text": "3+4*2"},
                                                    {"type": "python_output", "text": "11"},
                                                    {"type": "text", "text": " It is 11."}]},
                  {"role": "user", "content": "Thanks"}]},
]


@pytest.fixture
def world(chat_world, monkeypatch):
    monkeypatch.setenv("NANOPIPE_BASE_DIR", str(chat_world))
    monkeypatch.setenv("NANOPIPE_REPORT_DIR", str(chat_world / "report"))
    monkeypatch.setenv("NANOPIPE_DATA", "synthetic")
    return chat_world


@pytest.fixture(scope="module")
def exported(chat_world, tmp_path_factory):
    """The SFT model of the world exported by the CLI (in a child process, as a user runs it)."""
    out = tmp_path_factory.mktemp("export") / "sft_d2"
    result = subprocess.run([sys.executable, "-m", "scripts.export", "-i", "sft", "--out", str(out)],
                            env=subprocess_env(NANOPIPE_BASE_DIR=chat_world, NANOPIPE_REPORT_DIR=chat_world / "report"),
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return out


def hf_load(folder):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    model = AutoModelForCausalLM.from_pretrained(str(folder), trust_remote_code=True).eval()
    return model, AutoTokenizer.from_pretrained(str(folder), trust_remote_code=True)


def noisy(model, scale=0.3, seed=0):
    """The model with every weight shifted: after a few training steps the value-embedding gates, the x0 scalars
    and the output projections are still near their init, which would hide a wrong formula for them."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(scale * torch.randn_like(p) * p.abs().mean().clamp(min=0.05))
    return model


def test_export_folder_and_model_card(exported, world):
    names = {p.name for p in exported.iterdir()}
    assert {"config.json", "generation_config.json", "model.safetensors", "modeling_nanopipe.py", "tokenizer.json",
            "tokenizer_config.json", "README.md"} <= names
    config = json.loads((exported / "config.json").read_text())
    model, _, meta = load_model("sft", "d2")
    assert config["n_layer"] == model.config.n_layer == 2 and config["vocab_size"] == 512
    assert config["value_embedding_layers"] == [1] and config["x0_mixing"] is True
    card = (exported / "README.md").read_text()
    assert f"step {meta['step']}" in card and "| depth / width / heads | 2 / 64 / 2 |" in card
    assert "| pretraining tokens | 4096 |" in card and "| pretraining data | synthetic |" in card
    sections = report.read_sections()
    assert f"| val bpb | {sections['base_eval']['data']['bpb']['val']:.4f} |" in card
    assert f"| ChatCORE | {sections['chat_eval_sft']['data']['chatcore']:.4f} |" in card
    assert f"| CORE | {sections['base_eval']['data']['core']:.4f} |" in card
    # the module is self-contained: it imports nothing from nanopipe
    assert "nanopipe." not in "".join(line for line in (exported / "modeling_nanopipe.py").read_text().splitlines()
                                      if line.startswith(("import", "from")))


def test_logits_and_greedy_generation_match_nanopipe(exported, world):
    model, tokenizer, _ = load_model("sft", "d2")
    hf_model, _ = hf_load(exported)
    ids = tokenizer.render_for_completion(CONVERSATIONS[1])
    idx = torch.tensor([ids + list(range(40))])
    with torch.no_grad():
        diff = (model(idx) - hf_model(idx).logits).abs().max().item()
    assert diff < CHECK_TOLERANCE
    engine = Engine(model, tokenizer, use_tools=False)
    prompt = tokenizer.render_for_completion(CONVERSATIONS[0])
    ours = [step[0][0] for step in engine.generate(prompt, max_tokens=24, temperature=0.0)]
    out = hf_model.generate(torch.tensor([prompt]), max_new_tokens=24, do_sample=False)
    assert out[0, len(prompt):].tolist() == ours


def test_noisy_model_matches_with_cache_and_padding(world, tmp_path):
    """Every weight perturbed: logits, incremental decoding through transformers' cache, a left-padded batch and
    greedy generate() all agree with nanopipe."""
    model, tokenizer, meta = load_model("sft", "d2")
    noisy(model)
    folder = export_model(model, tokenizer, meta, "sft", tmp_path / "noisy_d2")
    hf_model, _ = hf_load(folder)
    torch.manual_seed(1)
    idx = torch.randint(0, 512, (2, 48))
    with torch.no_grad():
        expected = model(idx)
        assert (expected - hf_model(idx).logits).abs().max().item() < CHECK_TOLERANCE
        # prefill 40 tokens, then a chunk of 5, then 3 single tokens, through one cache
        first = hf_model(idx[:, :40], use_cache=True)
        cache = getattr(first, "cache", None) or first.past_key_values
        chunk = hf_model(idx[:, 40:45], cache=cache, use_cache=True).logits
        singles = [hf_model(idx[:, t:t + 1], cache=cache, use_cache=True).logits for t in range(45, 48)]
        got = torch.cat([first.logits, chunk, *singles], dim=1)
        assert (expected - got).abs().max().item() < CHECK_TOLERANCE
        # left padding: row 0 is 8 pads then the first 40 tokens of idx[0]
        pad = tokenizer.bos_token_id
        batch = torch.cat([torch.full((1, 8), pad), idx[:1, :40]], dim=1)
        mask = torch.cat([torch.zeros(1, 8, dtype=torch.long), torch.ones(1, 40, dtype=torch.long)], dim=1)
        batch, mask = torch.cat([batch, idx[1:, :48]]), torch.cat([mask, torch.ones(1, 48, dtype=torch.long)])
        position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
        padded = hf_model(batch, attention_mask=mask, position_ids=position_ids).logits
        assert (padded[0, 8:] - expected[0, :40]).abs().max().item() < CHECK_TOLERANCE
        assert (padded[1] - expected[1]).abs().max().item() < CHECK_TOLERANCE
    engine = Engine(model, tokenizer, use_tools=False)
    prompt = tokenizer.render_for_completion(CONVERSATIONS[2])
    ours = [step[0][0] for step in engine.generate(prompt, max_tokens=30, temperature=0.0)]
    assert len(ours) >= 10  # the perturbed model does not stop at once, so the comparison covers many steps
    out = hf_model.generate(torch.tensor([prompt]), max_new_tokens=30, do_sample=False)
    assert out[0, len(prompt):].tolist() == ours


def test_chat_template_renders_like_nanopipe(exported, world):
    _, tokenizer, _ = load_model("sft", "d2")
    _, hf_tok = hf_load(exported)
    for conversation in CONVERSATIONS:
        messages = conversation["messages"]
        prompt = hf_tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True)
        assert prompt["input_ids"] == tokenizer.render_for_completion(conversation)
    finished = CONVERSATIONS[2]["messages"][:2]
    full = hf_tok.apply_chat_template(finished, tokenize=True, return_dict=True)["input_ids"]
    assert full == tokenizer.render_conversation({"messages": finished}, max_tokens=10_000)[0]
    text = "Plain text, as in pretraining: 12 + 30 = 42."
    assert hf_tok(text)["input_ids"] == tokenizer.encode(text, prepend=tokenizer.bos_token_id)
    assert hf_tok.decode(tokenizer.encode(text)) == text
    with pytest.raises(Exception, match="alternate"):
        hf_tok.apply_chat_template([{"role": "assistant", "content": "hi"}], tokenize=False)


def test_check_catches_a_module_that_diverges(exported, world, tmp_path):
    """The export's own check fails loudly when the module computes something else than nanopipe."""
    model, _, _ = load_model("sft", "d2")
    broken = tmp_path / "broken_d2"
    broken.mkdir()
    for f in exported.iterdir():
        (broken / f.name).write_bytes(f.read_bytes())
    code = (broken / "modeling_nanopipe.py").read_text()
    assert "x0 = x\n" in code
    (broken / "modeling_nanopipe.py").write_text(code.replace("x0 = x\n", "x0 = 0.5 * x\n"))
    assert check_export(broken, noisy(model), list(range(1, 30))) > CHECK_TOLERANCE


def test_export_refuses_a_non_empty_out(world, tmp_path, capsys):
    out = tmp_path / "taken"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(SystemExit) as e:
        export.main(["-i", "sft", "--out", str(out)])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --out") and "--overwrite" in err
    assert [p.name for p in out.iterdir()] == ["keep.txt"]


def test_push_to_hub_uploads_the_folder(chat_world, tmp_path):
    """--push-to-hub against a loopback hub: the repo is created, one commit holds every exported file byte for
    byte, and every request carries HF_TOKEN."""
    out = tmp_path / "pushed_d2"
    env = subprocess_env(NANOPIPE_BASE_DIR=chat_world, NANOPIPE_REPORT_DIR=chat_world / "report")
    with HubServer() as hub:
        env.update(HF_ENDPOINT=hub.url, HF_TOKEN="hf_test_token", HF_HUB_DISABLE_TELEMETRY="1")
        result = subprocess.run([sys.executable, "-m", "scripts.export", "-i", "sft", "--out", str(out),
                                 "--push-to-hub", "someone/nanopipe-d2", "--private"],
                                env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"pushed: {hub.url}/someone/nanopipe-d2/commit/" in result.stdout
    repo = hub.repos["someone/nanopipe-d2"]
    assert repo["private"] and repo["commits"] == ["Upload a nanopipe model"]
    assert repo["files"] == {p.name: p.read_bytes() for p in out.iterdir()}
    posts = [r for r in hub.requests if r["method"] == "POST"]
    assert len(posts) >= 3 and all(r["headers"].get("authorization") == "Bearer hf_test_token" for r in posts)


def test_push_without_a_token_fails_before_exporting(chat_world, tmp_path):
    out = tmp_path / "never"
    env = subprocess_env(NANOPIPE_BASE_DIR=chat_world, NANOPIPE_REPORT_DIR=chat_world / "report",
                         HF_ENDPOINT="http://127.0.0.1:9", HF_HOME=tmp_path / "hf_home")
    env.pop("HF_TOKEN", None)
    result = subprocess.run([sys.executable, "-m", "scripts.export", "-i", "sft", "--out", str(out),
                             "--push-to-hub", "someone/x"], env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert result.stderr.startswith("error: --push-to-hub needs a Hugging Face token")
    assert not out.exists()


LM_EVAL_TASK = """task: nanopipe_tiny
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{answer}}}}"
metric_list:
  - metric: acc
"""


@pytest.mark.slow
def test_lm_eval_harness_scores_the_export_as_nanopipe_does(exported, world, tmp_path):
    """`lm_eval --model hf --model_args pretrained=DIR,trust_remote_code=True` on a tiny local multiple-choice
    task: every choice's log-likelihood equals nanopipe's own for the same tokens."""
    if shutil.which("lm_eval") is None and not (Path(sys.executable).parent / "lm_eval").exists():
        pytest.skip("lm-evaluation-harness is not installed (pip install lm_eval accelerate)")
    rows = [{"question": "The capital of Varnel is", "choices": ["Orlin", "Tessa", "blue"], "answer": 0},
            {"question": "What is 3 plus 4? It is", "choices": ["7", "2"], "answer": 0},
            {"question": "The cat sat on the", "choices": ["mat", "sky", "seven"], "answer": 1}]
    (tmp_path / "tiny.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "tasks").mkdir()
    (tmp_path / "tasks" / "tiny.yaml").write_text(LM_EVAL_TASK.format(data=tmp_path / "tiny.jsonl"))
    lm_eval = shutil.which("lm_eval") or str(Path(sys.executable).parent / "lm_eval")
    result = subprocess.run([lm_eval, "--model", "hf", "--model_args",
                             f"pretrained={exported},trust_remote_code=True,add_bos_token=True",
                             "--tasks", "nanopipe_tiny", "--include_path", str(tmp_path / "tasks"), "--device", "cpu",
                             "--batch_size", "2", "--output_path", str(tmp_path / "out"), "--log_samples"],
                            env=subprocess_env(HF_DATASETS_OFFLINE="1", HF_HUB_OFFLINE="1", HF_HOME=tmp_path / "hf"),
                            capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    samples = [json.loads(line) for f in (tmp_path / "out").rglob("samples_nanopipe_tiny_*.jsonl")
               for line in f.read_text().splitlines()]
    assert len(samples) == len(rows)
    model, tokenizer, _ = load_model("sft", "d2")
    correct = 0
    for sample in samples:
        row = rows[sample["doc_id"]]
        ours = []
        for choice in row["choices"]:
            context = tokenizer.encode(row["question"], prepend=tokenizer.bos_token_id)
            # lm_eval joins context and choice with its default target_delimiter, a space
            whole = tokenizer.encode(row["question"] + " " + choice, prepend=tokenizer.bos_token_id)
            with torch.no_grad():
                logprobs = torch.log_softmax(model(torch.tensor([whole[:-1]]))[0], dim=-1)
            ours.append(sum(logprobs[i - 1, whole[i]].item() for i in range(len(context), len(whole))))
        theirs = [float(resp[0][0]) for resp in sample["resps"]]
        assert theirs == pytest.approx(ours, abs=1e-3)
        correct += int(max(range(len(ours)), key=ours.__getitem__) == row["answer"])
        assert sample["acc"] == (max(range(len(theirs)), key=theirs.__getitem__) == row["answer"])
    results = json.loads(next((tmp_path / "out").rglob("results_*.json")).read_text())
    assert results["results"]["nanopipe_tiny"]["acc,none"] == pytest.approx(correct / len(rows))
