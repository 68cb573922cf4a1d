"""The operator's pool sizes, kept across clsd restarts in `<state_dir>/pools.json`.

1. `clsctl pools resize` (AdminService.ResizePools): once the pools have moved, `save` writes the
   targets and the home pool of every registered machine, atomically (a temporary file renamed).
2. clsd starts: `PoolTargets.load` reads them back (no file: the operator never resized; an
   unreadable one is logged and ignored, so clsd still starts).
3. A machine registers (cls/registry.py): `home_of(machine_id, configured)` is its home pool from
   the operator's last resize when that resize knew it, else the role it was configured with.
   After a restart the pools thus come back as `clsctl pools list` showed them, machine by
   machine as they register again; a machine the resize never saw keeps its configured role.
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

from proto.roles import Role

log = logging.getLogger("clsd.pools")

FILE_NAME = "pools.json"


@dataclass
class PoolTargets:
    path: Path | None
    """None: nothing is kept (no state directory configured)."""
    num_prompt: int | None = None
    num_token: int | None = None
    homes: dict[str, Role] = field(default_factory=dict)

    @classmethod
    def load(cls, state_dir: Path | None) -> PoolTargets:
        if state_dir is None:
            return cls(None)
        path = state_dir / FILE_NAME
        try:
            data = json.loads(path.read_text())
            homes = {str(mid): Role(home).home for mid, home in data["homes"].items()}
            targets = cls(path, data.get("num_prompt"), data.get("num_token"), homes)
        except FileNotFoundError:
            return cls(path)
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
            log.error("%s is unreadable (%s): pools start from the machines' configured roles", path, e)
            return cls(path)
        log.info("operator pool sizes from %s: prompt %s, token %s (%d machines named)", path,
                 targets.num_prompt, targets.num_token, len(homes))
        return targets

    def home_of(self, machine_id: str, configured: Role) -> Role:
        return self.homes.get(machine_id, configured)

    def save(self, num_prompt: int, num_token: int, homes: dict[str, Role]) -> None:
        """Keeps the targets of a resize (raises OSError when the state directory is unusable)."""
        self.num_prompt, self.num_token, self.homes = num_prompt, num_token, dict(homes)
        if self.path is None:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        body = json.dumps({"num_prompt": num_prompt, "num_token": num_token, "saved_at": time.time(),
                           "homes": {mid: role.value for mid, role in sorted(homes.items())}}, indent=1)
        with open(tmp, "w") as f:
            f.write(body + "\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path)
