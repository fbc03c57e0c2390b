"""
The synthetic source: a small, deterministic, invented world, so the whole pipeline runs offline.

One seed builds one world: 40 countries (capital, language, main export), 40 people (job, home city,
which is a capital), 24 animals (fur colour, food, habitat), a list of a few hundred English words, and
small-number arithmetic. All names are invented, so nothing leaks in from (or out to) real data. Every
fact is written many times, in varied templates and orders, so a tiny model trained for minutes on a CPU
learns it. The same seed always gives byte-identical output (one random.Random per stream, seeded by a
string; no hash() or set order anywhere).

facts.py builds the world; documents.py, core.py and chat.py render it (1, 2, and 3 + 4 below); source.py writes
data/synthetic/ (`python -m scripts.dataset synthetic`); tasks.py reads the chat files back as Tasks.

The world is rendered four ways:

1. Pretraining documents (documents.py): `generate_documents(seed, num_docs)` (country profiles, biographies, animal
   sheets, travel stories, quizzes, fact digests, arithmetic practice, spelling lists). Documents come in
   a fixed order, so the first N documents do not depend on `num_docs`. `python -m scripts.dataset
   synthetic` writes DEFAULT_NUM_SHARDS shards of DOCS_PER_SHARD documents (the last is validation).

2. A CORE-format eval bundle, `eval_bundle/` (same layout as the real DCLM bundle):
   - core.yaml: `icl_tasks`: [{label, dataset_uri (relative to eval_data/), num_fewshot: [k],
     icl_task_type, continuation_delimiter}]
   - eval_meta_data.csv: the real file's columns; `Eval Task`, `Random baseline` (percent) are read.
   - eval_data/world/<label>.jsonl, one item per line:
     world_quiz_mc       multiple_choice 0-shot  {"query": "Question: What is the capital of X?\\nAnswer:",
                                                  "choices": [4 objects], "gold": i}
     world_facts_mc      multiple_choice 3-shot  {"query": "The capital of X is", "choices": [...], "gold": i}
     world_facts_schema  schema          0-shot  {"context_options": ["The capital of X is", "The capital of Y is"],
                                                  "continuation": "Quen.", "gold": i}
     world_facts_lm      language_modeling 5-shot {"context": "The capital of X is", "continuation": "Quen"}
     world_arith_lm      language_modeling 5-shot {"context": "7 + 5 =", "continuation": "12"}
   Every item's gold text (query/context + " " + answer) appears verbatim in the pretraining documents.
   Four harder tasks, which a small model learns only partly in the CPU demo's budget (so CORE ranks runs):
     world_two_hop_mc, world_two_hop_export_mc  multiple_choice 3-shot  {"query": "<person> lives in a country
                         where people speak", ...}: two facts joined (home city, then its country's language
                         or export), never written as one sentence
     world_spell_lm      language_modeling 5-shot {"context": "The word apple is spelled", "continuation": "a,p,p,l,e"}
     world_sums_lm       language_modeling 5-shot {"context": "17 plus 5 equals", "continuation": "22"}
   A language-modeling task's random baseline is the share of its most common continuation.

3. SFT conversations, `chat/sft_train.jsonl` and `chat/sft_val.jsonl`: one `{"messages": [...]}` per line
   in the brief's format (a few start with a system message; some are multi-turn). Families: world
   questions in several phrasings, answered with the fact's sentence; "I don't know" for places, people
   and animals the world does not contain; multiple choice in nanochat's render_mc format (reply = the
   letter); sums in symbols and words ("12*7", "what is 12 times 7") and word problems, solved with
   calculator calls (parts: text "12 * 7 = ", {"type": "python", "text": "12*7"}, {"type": "python_output",
   "text": "84"}, text "84."); letter counting with a `' word'.count('x')` call; spelling a word out; and
   identity ("I am nanopipe ..."). Replies are plain sentences, with no `#### n` line.

4. Chat-eval tasks, `chat/eval_<task>.jsonl`, one item per line, none of whose questions is in the SFT
   files (held-out phrasings, unseen problems; world_mc: facts SFT never asks as multiple choice):
   - eval_world_mc:    categorical. {"messages": [user: render_mc(...), assistant: "B"],
                       "letters": ["A", "B", "C", "D"], "answer": "B"}. Facts held out of SFT's quizzes;
                       each fact appears four times with the gold letter in each position (chance = 25 %).
   - eval_world_facts: generative. A fact asked in a phrasing SFT never uses; "answer": the object
                       (text); correct iff the completion contains it as a word.
   - eval_world_arith: generative. Sums in held-out phrasings and unseen word problems; "answer": 84 (int);
                       correct iff the completion's last number equals `answer`.
   - eval_world_spell: generative. Letter counting ("answer": int) and spelling out ("answer": "a,p,p,l,e"),
                       in held-out phrasings.
"""
