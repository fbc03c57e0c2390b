"""The DCLM CORE eval bundle (22 tasks): fetch and unpack it into <base>/eval_bundle/ (core_eval.py reads it).

    python -m scripts.dataset eval-bundle
"""

import os
import shutil
import tempfile
import zipfile
from pathlib import Path

from nanopipe.common import UserError, get_base_dir
from nanopipe.download import download_file

EVAL_BUNDLE_URL = "https://karpathy-public.s3.us-west-2.amazonaws.com/eval_bundle.zip"


def verify_zip(path):
    with zipfile.ZipFile(path) as z:
        bad = z.testzip()
        if bad is not None:
            raise ValueError(f"bad CRC for {bad}")


def download_eval_bundle(**download_kwargs):
    """Fetch and unpack the CORE eval bundle into <base>/eval_bundle/ (core.yaml, eval_meta_data.csv, eval_data/)."""
    base = get_base_dir()
    out = base / "eval_bundle"
    if (out / "core.yaml").exists():
        print(f"{out} already present")
        return out
    url = os.environ.get("NANOPIPE_EVAL_BUNDLE_URL") or EVAL_BUNDLE_URL
    zip_path = base / "eval_bundle.zip"
    download_file(url, zip_path, verify=verify_zip, **download_kwargs)
    tmp = Path(tempfile.mkdtemp(dir=base, prefix=".eval_bundle."))
    try:
        with zipfile.ZipFile(zip_path) as z:
            z.extractall(tmp)  # zipfile drops absolute and ".." path parts
        roots = sorted(p.parent for p in tmp.rglob("core.yaml") if "__MACOSX" not in p.parts)
        if not roots:
            zip_path.unlink()
            raise UserError(f"{url} holds no core.yaml: not a CORE eval bundle")
        if out.exists():
            shutil.rmtree(out)  # an incomplete earlier bundle (it had no core.yaml)
        os.replace(roots[0], out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    zip_path.unlink()
    print(f"wrote {out}")
    return out

