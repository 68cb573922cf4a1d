"""clsctl, the command line of the cluster (entry point `cls.cli.clsctl:main`).

- `clsctl.py`: the parser, the engine commands (models, chat) and the commands that talk to clsd
  (generate, pools, machines); `output.py`: what they print.
- `local_up.py`: `clsctl local up`; `local_cluster.py`: clsd and its machines as child processes
  (`LocalCluster`, also used by benchmarks and tests).
- `simulate.py`: `clsctl simulate` over the simulator (cls/sim/simulator.py and cls/sim_*.py).
- `progress.py`: the stderr progress bar of `clsctl simulate` and `clsctl bench` (cls/bench/).
"""
