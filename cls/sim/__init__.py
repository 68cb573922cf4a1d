"""The cluster simulator: clsd's router and pools and mlsd's MachineScheduler in virtual time
(`simulator.py`), cluster designs from YAML (`design.py`), traces (`traces.py`), one run's
records and aggregates (`result.py`), SLO reports and goodput (`report.py`), sweeps (`runs.py`)
and PNG plots (`plots.py`). `clsctl simulate` (cls/cli/simulate.py) is its command line."""
