"""Pure machine-level scheduling policies: no I/O, no clock of their own, no torch.

The daemons (`mlsd`) and the cluster simulator drive the very same objects: state goes in,
a plan dataclass comes out, results go back in.
"""

from mls.policy.common import BlockBudget, Job, QueueFull, blocks_for_tokens
from mls.policy.machine import MachineLoad, MachineScheduler, TurnPlan, TurnResult, WorkKind
from mls.policy.mixed import MIXED_POLICIES, MixedPlan, MixedScheduler, PromptChunk
from mls.policy.prompt import PromptBatch, PromptScheduler
from mls.policy.token import TokenPlan, TokenScheduler

__all__ = ["BlockBudget", "Job", "QueueFull", "blocks_for_tokens", "PromptBatch", "PromptScheduler",
           "TokenPlan", "TokenScheduler", "MixedPlan", "MixedScheduler", "MIXED_POLICIES",
           "PromptChunk", "MachineLoad", "MachineScheduler", "TurnPlan", "TurnResult", "WorkKind"]
