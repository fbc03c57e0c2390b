"""The data profile: from a dataset name, everything the stages decide by it (CORE bundle, SFT mixture,
chat-eval task set, sample prompts).

Every stage resolves its --data (else $NANOPIPE_DATA, else fineweb-edu) with data_profile(); no stage asks which
dataset it is in any other way. The synthetic world brings its own CORE bundle, SFT mixture, chat-eval tasks and
prompts about its own facts; every other dataset (a download or your own files) is real text and gets the real ones.
"""

import os
from dataclasses import dataclass
from pathlib import Path

from nanopipe import cli
from nanopipe.common import UserError, get_base_dir
from nanopipe.shards import dataset_dir, read_manifest
from tasks.registry import EVAL_SETS, SFT_MIXTURES
from tasks.world.facts import sample_prompts as world_prompts

DEFAULT_DATA = "fineweb-edu"
# greedy samples of a model pretrained on real text (nanochat's)
REAL_SAMPLE_PROMPTS = [
    "The capital of France is",
    "The chemical symbol of gold is",
    "If yesterday was Friday, then tomorrow will be",
    "The opposite of hot is",
    "The planets of the solar system are:",
    "My favorite color is",
    "If 5*x + 3 = 13, then x is",
]


@dataclass(frozen=True)
class DataProfile:
    data_name: str      # the pretraining dataset: <base>/data/<data_name>/
    kind: str           # "synthetic" (the world's own evals, chats and prompts) or "real"

    @property
    def sft_mixture(self) -> str:
        """chat_sft's default --mixture."""
        return SFT_MIXTURES[self.kind]

    @property
    def eval_tasks(self) -> list[str]:
        """chat_eval's default task set (ChatCORE averages over it)."""
        return EVAL_SETS[self.kind]

    def eval_bundle_dir(self) -> Path:
        """Where the CORE bundle is: $NANOPIPE_EVAL_BUNDLE, the world's own, or the downloaded DCLM one."""
        if os.environ.get("NANOPIPE_EVAL_BUNDLE"):
            path = Path(os.environ["NANOPIPE_EVAL_BUNDLE"]).expanduser()
            fix = "point NANOPIPE_EVAL_BUNDLE at a folder with core.yaml, eval_meta_data.csv and eval_data/"
        elif self.kind == "synthetic":
            path = dataset_dir(self.data_name) / "eval_bundle"
            fix = "run `python -m scripts.dataset synthetic`"
        else:
            path = get_base_dir() / "eval_bundle"
            fix = "run `python -m scripts.dataset eval-bundle` (or set NANOPIPE_EVAL_BUNDLE)"
        if not (path / "core.yaml").exists():
            raise UserError(f"no CORE eval bundle in {path}: {fix}")
        return path

    def sample_prompts(self) -> list[str]:
        """Sentence starts for greedy samples: about the world the model read (the seed its dataset was built
        with), or nanochat's general-knowledge prompts for real text."""
        if self.kind == "real":
            return REAL_SAMPLE_PROMPTS
        source = (read_manifest(dataset_dir(self.data_name)) or {}).get("source") or {}
        return world_prompts(source.get("seed", 0))


def default_data_name(flag=None) -> str:
    """The dataset a stage reads: its --data flag, else $NANOPIPE_DATA, else fineweb-edu."""
    if flag:
        return flag
    name = os.environ.get("NANOPIPE_DATA") or DEFAULT_DATA
    try:
        return cli.check_name(name, "NANOPIPE_DATA")
    except ValueError as e:
        raise UserError(str(e)) from None


def data_profile(flag=None) -> DataProfile:
    """The profile of the dataset a stage reads (default_data_name(flag))."""
    name = default_data_name(flag)
    return DataProfile(name, "synthetic" if name == "synthetic" else "real")
