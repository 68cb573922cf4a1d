"""`clsctl local up`: clsd and the machines of configs/local.yaml as child processes on this host.

The process management lives in local_cluster.py; this is the command: start, print how to talk
to the cluster, optionally answer one question, wait for Ctrl-C / SIGTERM, stop (machines first).
"""

from __future__ import annotations

import argparse
import json
import shlex
import signal
import sys
import threading

from cls.cli.local_cluster import LocalCluster, LocalClusterError, LocalConfig
from cls.cli.output import error, machines_table, stream_answer, timing_line
from cls.client import ClsError

DEFAULT_LOCAL_CONFIG = "configs/local.yaml"


def _print_local_help(cluster: LocalCluster, question_example: str) -> None:
    addr, token = cluster.address, cluster.token_file
    shell_q, py_q = shlex.quote(question_example), json.dumps(question_example)
    print(f"cluster up: clsd at {addr} (metrics port {cluster.metrics_port}), "
          f"{len(cluster.registered)} machines, logs in {cluster.config.run_dir}/")
    print(machines_table(cluster.registered))
    print(f"""
Talk to it:
  clsctl generate --chat --address {addr} {shell_q}
  clsctl pools list --address {addr} --token-file {token}
  clsctl machines list --address {addr} --token-file {token}
From Python:
  from cls.client import ClsClient
  client = ClsClient("{addr}", admin_token_file="{token}")
  print(client.generate({py_q}, chat=True).text)
""")
    if http := cluster.http_help():
        print(http)


def _cmd_local_up(args: argparse.Namespace) -> int:
    stop = threading.Event()
    interruptible = [True]  # starting or asking: a signal interrupts; waiting: it only wakes us

    def on_signal(signum, frame):
        stop.set()
        if interruptible[0]:
            interruptible[0] = False
            raise KeyboardInterrupt

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    cluster = None
    try:
        cfg = LocalConfig.load(args.config)
        clsd_sets = list(args.clsd_set) + ([f"grpc_port={args.port}"] if args.port is not None else [])
        cluster = LocalCluster(cfg, clsd_overrides=clsd_sets, machine_overrides=args.machine_set)
        print(f"starting clsd and {len(cfg.machines)} machines; logs in {cfg.run_dir}/",
              file=sys.stderr, flush=True)
        cluster.start()
        _print_local_help(cluster, args.ask or "What is the capital of France?")
        if args.ask:
            print(f"> {args.ask}")
            with cluster.client() as client:
                done = stream_answer(client, args.ask, chat=True, max_tokens=args.max_tokens)
            print(timing_line(done), file=sys.stderr)
        interruptible[0] = False
        print("Ctrl-C stops the cluster.", flush=True)
        # Timed: a signal may land on one of grpc's threads, and Python runs the handler in the
        # main thread only when it wakes up; an untimed wait could sleep through Ctrl-C.
        while not stop.wait(0.5):
            pass
        return 0
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except LocalClusterError as e:
        return error(str(e))
    except ClsError as e:
        return error(str(e))
    finally:
        interruptible[0] = False
        if cluster is not None:
            print("stopping: machines drain first, then clsd", file=sys.stderr, flush=True)
            for name, code in cluster.stop().items():
                if code:
                    print(f"warning: {name} exited with code {code}", file=sys.stderr)
        for s, handler in previous.items():
            signal.signal(s, handler)


def add_parser(groups: argparse._SubParsersAction) -> None:
    local = groups.add_parser("local", help="run a whole cluster on this host",
                              description="Run clsd and its machines as child processes.")
    cmds = local.add_subparsers(dest="command", metavar="COMMAND", required=True)
    p = cmds.add_parser(
        "up", help="start clsd and the machines, wait for Ctrl-C, stop them",
        description="Start clsd and every machine of the config (machines register with clsd), "
                    "print how to talk to the cluster, optionally answer one question, then "
                    "wait for Ctrl-C or SIGTERM and stop the machines (they drain) and clsd.")
    p.add_argument("--config", default=DEFAULT_LOCAL_CONFIG, metavar="PATH",
                   help=f"local cluster config (default: {DEFAULT_LOCAL_CONFIG})")
    p.add_argument("--ask", default=None, metavar="QUESTION",
                   help="stream the cluster's answer to QUESTION once it is up")
    p.add_argument("--max-tokens", type=int, default=0, metavar="N",
                   help="output tokens for --ask (default: the server's default)")
    p.add_argument("--port", type=int, default=None,
                   help="clsd gRPC port (0: any free port; default: from the clsd config)")
    p.add_argument("--clsd-set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a clsd config key (repeatable)")
    p.add_argument("--machine-set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a key in every machine's config (repeatable)")
    p.set_defaults(func=_cmd_local_up)
