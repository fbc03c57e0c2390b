import pytest
import torch

from nanopipe.sft_data import SFTLoader
from nanopipe.tokenizer import Tokenizer


def conversation(i: int) -> dict:
    """Conversations of varied length, some with a tool call, so packing has real choices to make."""
    question = f"question number {i}: " + "please explain " * (i % 7)
    if i % 3 == 0:
        answer = [{"type": "text", "text": f"Let me compute {i} times 3. "},
                  {"type": "python", "text": f"{i}*3"},
                  {"type": "python_output", "text": str(i * 3)},
                  {"type": "text", "text": f"The answer is {i * 3}."}]
    else:
        answer = f"answer {i} " + "because reasons " * (i % 5)
    return {"messages": [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]}


CONVERSATIONS = [conversation(i) for i in range(60)]


@pytest.fixture(scope="module")
def tokenizer():
    texts = [str(c) for c in CONVERSATIONS] * 3
    return Tokenizer.train(iter(texts), vocab_size=300)


def test_only_assistant_tokens_are_trained(tokenizer):
    loader = SFTLoader(tokenizer, CONVERSATIONS, batch_size=2, seq_len=64, loop=False)
    for x, y in loader:
        assert x.shape[1] == 64 and y.shape == x.shape
        assert (x[:, 0] == tokenizer.bos_token_id).all()      # every row starts a conversation
        trained = y[y != -1].tolist()
        assert tokenizer.encode_special("<|user_start|>") not in trained
        assert tokenizer.encode_special("<|output_start|>") not in trained
        assert tokenizer.bos_token_id not in trained          # padding is never a target


def test_targets_match_render_mask(tokenizer):
    conv = CONVERSATIONS[3]  # has a tool call
    ids, mask = tokenizer.render_conversation(conv, max_tokens=1000)
    loader = SFTLoader(tokenizer, [conv], batch_size=1, seq_len=len(ids) + 5, loop=False)
    x, y = next(loader)
    expected = [t if m else -1 for t, m in zip(ids[1:], mask[1:])] + [-1] * 6  # row = seq_len + 1 tokens
    assert y[0].tolist() == expected
    assert tokenizer.encode_special("<|python_start|>") in y[0].tolist()


def test_conversations_are_whole_and_each_used_once_per_epoch(tokenizer):
    loader = SFTLoader(tokenizer, CONVERSATIONS, batch_size=3, seq_len=128, loop=False)
    starts = 0
    for x, _ in loader:
        starts += int((x == tokenizer.bos_token_id).logical_and(
            torch.roll(x, -1, dims=1) == tokenizer.encode_special("<|user_start|>")).sum())
    assert starts == len(CONVERSATIONS)


def test_exact_resume(tokenizer):
    full = SFTLoader(tokenizer, CONVERSATIONS, batch_size=2, seq_len=96)
    expected = [next(full) for _ in range(12)]
    first = SFTLoader(tokenizer, CONVERSATIONS, batch_size=2, seq_len=96)
    for _ in range(5):
        next(first)
    resumed = SFTLoader(tokenizer, CONVERSATIONS, batch_size=2, seq_len=96, state=first.state_dict())
    for want in expected[5:]:
        got = next(resumed)
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    assert resumed.progress > first.progress


def test_ranks_read_disjoint_conversations(tokenizer):
    seen = []
    for rank in range(2):
        loader = SFTLoader(tokenizer, CONVERSATIONS, batch_size=4, seq_len=128, rank=rank, world_size=2, loop=False)
        list(loader)
        seen.append(set(range(rank, len(CONVERSATIONS), 2)))
        assert loader.progress == 1.0
    assert not seen[0] & seen[1]


def test_fully_masked_batch_gives_zero_not_nan(tokenizer):
    """A conversation whose user turn alone fills a row is cropped to no trained token at all: the loader's
    batch is all -1 targets, and the model's loss on it is 0 with finite gradients, not NaN."""
    from nanopipe.gpt import GPTConfig, build_model
    long_question = {"messages": [{"role": "user", "content": "please explain " * 40},
                                  {"role": "assistant", "content": "answer"}]}
    loader = SFTLoader(tokenizer, [long_question] * 2, batch_size=2, seq_len=16, loop=False)
    x, y = next(loader)
    assert x.shape == (2, 16) and (y == -1).all()
    model = build_model(GPTConfig(sequence_len=16, vocab_size=tokenizer.vocab_size, n_layer=1, n_head=1,
                                  n_kv_head=1, n_embd=32), "cpu")
    loss = model(x, y)
    loss.backward()
    assert torch.isfinite(loss) and loss.item() == 0.0
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
