"""Exceptions of the NVMe driver, on `env.errors.UserblkError`.

Each one carries the facts it is about as attributes (controller, queue, command identifier,
opcode, namespace, LBA range, NVMe status), and its message names them with the spec's words,
so that a failure read in a log says what happened without a debugger:

    nvme0: Read (opcode 02h) failed on qid 1 cid 17 nsid 1 LBA 0x1000+8: LBA Out of Range
    (SCT 0h, SC 80h, DNR)

Completion callbacks receive an `NvmeStatus`, not an exception (DESIGN.md, "Errors"); these
exceptions are raised by blocking calls and by bring-up.

- `NvmeError`: base of everything below.
- `CommandError`: a command completed with an error status.
- `CommandTimeout`: a command did not complete in time.
- `UnsupportedCommand`: the controller or namespace does not support a command (rejected before
  submission: Identify says so).
- `ControllerError`: bring-up or controller state failures; subclasses `ControllerNotReady`
  (CSTS.RDY did not follow CC.EN within CAP.TO), `ControllerFatal` (CSTS.CFS set) and
  `InvalidRegisterValue` (a register holds something no controller may report).
- `ControllerDetached`: the controller was detached (or, as `ControllerRemoved`, it vanished:
  its registers read as all ones) and is being used.
- `QueueFull`, `NoResources`: nothing is wrong, but there is no room now (a full submission queue,
  no free command identifier, queue identifier or request); try again after completions.
- `DataFormatError`: data the controller returned (Identify, log page) is malformed.
- `InvalidOption`: a `ControllerOptions` field holds a value the driver cannot use (also an
  `InvalidArgument`); `option` names the field.
- `AlreadyAttached`: the controller (an emulated one's transport, or a PCI function) is already
  driven by another `Controller` of this process.
"""
from env.errors import InvalidArgument, UserblkError
from nvme.spec import opcode_name
from nvme.status import NvmeStatus


def _prefix(controller):
    return f"{controller}: " if controller else ""


class NvmeError(UserblkError):
    """Base of every NVMe driver error. `controller` names the controller, when known."""

    def __init__(self, message, controller=None):
        super().__init__(_prefix(controller) + message)
        self.controller = controller


class CommandError(NvmeError):
    """A command completed with an error status.

    Attributes: `status` (NvmeStatus), `opcode`, `opcode_name`, `admin`, `qid`, `cid`, `nsid`,
    `lba` and `nlb` (the LBA range of an I/O command, else None), `cdw0` (the completion's
    command-specific dword), `controller`."""

    def __init__(self, status, opcode, *, admin=False, qid=None, cid=None, nsid=None, lba=None,
                 nlb=None, cdw0=None, controller=None, message=None):
        self.status = NvmeStatus.of(status)
        self.opcode = opcode
        self.admin = bool(admin) if qid is None else (admin or qid == 0)
        self.opcode_name = opcode_name(opcode, admin=self.admin)
        self.qid = qid
        self.cid = cid
        self.nsid = nsid
        self.lba = lba
        self.nlb = nlb
        self.cdw0 = cdw0
        where = []
        if qid is not None:
            where.append(f"qid {qid}")
        if cid is not None:
            where.append(f"cid {cid}")
        if nsid is not None:
            where.append(f"nsid {nsid}" if nsid != 0xFFFFFFFF else "nsid all")
        if lba is not None:
            where.append(f"LBA 0x{lba:x}" + (f"+{nlb}" if nlb is not None else ""))
        text = f"{self.opcode_name} (opcode {opcode:02x}h) failed"
        if where:
            text += " on " + " ".join(where)
        text += f": {self.status}"
        if message:
            text += f" ({message})"
        super().__init__(text, controller)

    @classmethod
    def from_completion(cls, cpl, *, opcode, admin=False, qid=None, nsid=None, lba=None,
                        nlb=None, controller=None, message=None):
        """From a completion object with `status` (NvmeStatus or the raw 16-bit field), `cid`,
        `sqid` and `cdw0` attributes (nvme.qpair.Completion, nvme.spec.Completion)."""
        status = getattr(cpl, "status")
        if not isinstance(status, NvmeStatus):
            status = NvmeStatus.decode(status)
        return cls(status, opcode, admin=admin,
                   qid=qid if qid is not None else getattr(cpl, "sqid", None),
                   cid=getattr(cpl, "cid", None), nsid=nsid, lba=lba, nlb=nlb,
                   cdw0=getattr(cpl, "cdw0", None), controller=controller, message=message)

    @property
    def sct(self):
        return self.status.sct

    @property
    def sc(self):
        return self.status.sc

    @property
    def dnr(self):
        return self.status.dnr

    @property
    def retryable(self):
        return self.status.retryable


class CommandTimeout(NvmeError):
    """A command did not complete in time.

    Either `CommandTimeout("free text")`, or structured:
    `CommandTimeout(opcode=0x02, timeout=30, qid=1, cid=7, nsid=1, lba=0, nlb=8, aborted=True)`,
    which builds the message from the facts. `aborted` says whether an Abort was sent for it
    (`abort_status`: the Abort's own outcome, if known)."""

    def __init__(self, message=None, *, opcode=None, timeout=None, admin=False, qid=None,
                 cid=None, nsid=None, lba=None, nlb=None, aborted=False, abort_status=None,
                 controller=None):
        self.opcode = opcode
        self.admin = bool(admin) or qid == 0
        self.opcode_name = opcode_name(opcode, admin=self.admin) if opcode is not None else None
        self.timeout = timeout
        self.qid, self.cid, self.nsid, self.lba, self.nlb = qid, cid, nsid, lba, nlb
        self.aborted = aborted
        self.abort_status = abort_status
        if message is None:
            what = (f"{self.opcode_name} (opcode {opcode:02x}h)" if opcode is not None
                    else "a command")
            where = " ".join(w for w in (
                f"qid {qid}" if qid is not None else "",
                f"cid {cid}" if cid is not None else "",
                f"nsid {nsid}" if nsid is not None else "",
                (f"LBA 0x{lba:x}" + (f"+{nlb}" if nlb is not None else ""))
                if lba is not None else "",
            ) if w)
            message = what + (f" on {where}" if where else "") + " did not complete"
            if timeout is not None:
                message += f" within {timeout:g} s"
            if aborted:
                message += "; it was aborted"
        super().__init__(message, controller)


class UnsupportedCommand(NvmeError, InvalidArgument):
    """The controller or namespace does not support the command (Identify says so: ONCS, OACS,
    VWC...), so it is rejected before submission. Also an InvalidArgument."""


class ControllerError(NvmeError):
    """The controller could not be brought up or is in a state the driver cannot use.
    `registers` holds the register values read when it happened ({"CSTS": 0x1, ...})."""

    def __init__(self, message, controller=None, registers=None):
        if registers:
            message += " [" + " ".join(f"{k}=0x{v:x}" for k, v in registers.items()) + "]"
        super().__init__(message, controller)
        self.registers = dict(registers or {})


class ControllerNotReady(ControllerError):
    """CSTS.RDY did not reach `expected` within `timeout` seconds (CAP.TO) after CC.EN changed."""

    def __init__(self, expected, timeout, controller=None, registers=None):
        self.expected = expected
        self.timeout = timeout
        super().__init__(
            f"CSTS.RDY did not become {int(expected)} within {timeout:g} s (CAP.TO) after "
            f"CC.EN was set to {int(expected)}", controller, registers)


class ControllerFatal(ControllerError):
    """CSTS.CFS (Controller Fatal Status) is set: the controller must be reset."""

    def __init__(self, message="controller fatal status (CSTS.CFS) is set; the controller needs "
                 "a reset", controller=None, registers=None):
        super().__init__(message, controller, registers)


class InvalidRegisterValue(ControllerError):
    """A register holds a value no conforming controller reports (e.g. CAP.MQES of 0, a page
    size range that excludes every host page size, all ones from a vanished device)."""

    def __init__(self, register, value, why, controller=None):
        self.register = register
        self.value = value
        super().__init__(f"{register} = 0x{value:x}: {why}", controller)


class ControllerDetached(NvmeError):
    """The controller was detached (or removed) and is used anyway."""

    def __init__(self, message="the controller is detached", controller=None):
        super().__init__(message, controller)


class ControllerRemoved(ControllerDetached):
    """The device vanished (surprise removal): its registers read as all ones."""

    def __init__(self, message="the controller was removed (registers read as all ones)",
                 controller=None):
        super().__init__(message, controller)


class TransportError(ControllerError):
    """An NVMe over Fabrics connection failed or was refused: the socket (connect, send,
    receive, closed by the peer), the target's PDUs (malformed, a bad digest, a C2HTermReq), a
    timeout, or a Fabrics Connect the target rejected. `kind` says which: "socket", "protocol",
    "digest", "terminated", "timeout", "rejected" or "closed"."""

    def __init__(self, message, controller=None, kind=None):
        super().__init__(message, controller)
        self.kind = kind


class QueueFull(NvmeError):
    """A submission queue has no free slot and the caller asked not to queue the request.
    `qid` and `depth` say which queue and how deep it is."""

    def __init__(self, qid, depth=None, controller=None):
        self.qid = qid
        self.depth = depth
        text = f"submission queue {qid} is full"
        if depth is not None:
            text += f" ({depth} entries)"
        super().__init__(text + "; retry after completions", controller)


class NoResources(NvmeError):
    """A fixed resource is exhausted: free requests or command identifiers of a queue pair,
    I/O queue identifiers granted by the controller (Number of Queues), PRP list pages...
    `resource` names it."""

    def __init__(self, resource, message=None, controller=None):
        self.resource = resource
        super().__init__(message or f"no {resource} available", controller)


class DataFormatError(NvmeError):
    """Data returned by the controller is malformed (a namespace descriptor with a wrong length,
    a log page shorter than its header says...)."""


class InvalidOption(NvmeError, InvalidArgument):
    """A controller option is out of its range or of the wrong type, found when the options are
    made or changed (not later, at the first queue pair). `option` is the field's name, `value`
    what it was given."""

    def __init__(self, option, value, expected):
        self.option = option
        self.value = value
        super().__init__(f"ControllerOptions.{option} must be {expected}, not {value!r}")


class AlreadyAttached(NvmeError):
    """The controller is already driven by a `Controller` of this process: two drivers over one
    controller would re-initialise it under each other. `owner` names the one that has it."""

    def __init__(self, message, controller=None, owner=None):
        self.owner = owner
        super().__init__(message, controller)
