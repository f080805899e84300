"""Fault injection rules of the emulated controller.

A rule matches commands by queue, opcode, namespace and LBA, and says what happens to them:
"inject" completes them with a chosen status (without executing them), "hold" fetches them and
never completes them until `release()` (how a driver's timeout, abort and reset paths are
exercised), "delay" completes them only after a number of `tick()` calls. Rules are checked in
the order they were added; the first that matches wins. `count` limits how many commands a rule
takes (None: all that match, until `cancel()`).
"""
import attrs

from nvme.spec import NvmOpcode
from nvme.status import NvmeStatus

# NVM commands whose CDW10-12 hold SLBA and NLB (NVM 3.2, 3.3)
LBA_OPCODES = frozenset((NvmOpcode.READ, NvmOpcode.WRITE, NvmOpcode.COMPARE,
                         NvmOpcode.WRITE_ZEROES, NvmOpcode.WRITE_UNCORRECTABLE,
                         NvmOpcode.VERIFY))

INJECT = "inject"
HOLD = "hold"
DELAY = "delay"


@attrs.define(eq=False)
class FaultRule:
    """One rule. `hits` counts the commands it took; `remaining` how many more it will take
    (None: unlimited)."""
    action: str
    opcode: int = None
    admin: bool = False
    qid: int = None
    nsid: int = None
    lba: int = None
    remaining: int = 1
    status: NvmeStatus = None
    ticks: int = 0
    hits: int = 0

    def matches(self, qid, cmd):
        if self.remaining is not None and self.remaining <= 0:
            return False
        if (qid == 0) != self.admin:
            return False
        if self.qid is not None and qid != self.qid:
            return False
        if self.opcode is not None and cmd.opc != self.opcode:
            return False
        if self.nsid is not None and cmd.nsid != self.nsid:
            return False
        if self.lba is not None:
            if self.admin or cmd.opc not in LBA_OPCODES:
                return False
            slba = cmd.cdw11 << 32 | cmd.cdw10
            if not slba <= self.lba < slba + (cmd.cdw12 & 0xFFFF) + 1:
                return False
        return True

    def take(self):
        self.hits += 1
        if self.remaining is not None:
            self.remaining -= 1

    @property
    def active(self):
        return self.remaining is None or self.remaining > 0

    def cancel(self):
        """Stop matching (commands already held or delayed stay so)."""
        self.remaining = 0


@attrs.define(eq=False)
class Pending:
    """A fetched command the controller has not completed yet (held, delayed, or an AER)."""
    sq: object
    cmd: object
    rule: FaultRule = None
    ticks_left: int = 0

    @property
    def qid(self):
        return self.sq.qid

    @property
    def cid(self):
        return self.cmd.cid
