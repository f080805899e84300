"""How the emulated controller's internals signal failures to its command loop.

These never leave the emulator: `CommandFailed` becomes the status of the command's completion,
`DmaFault` a Data Transfer Error (or, for the controller's own queues, Controller Fatal Status).
"""
from nvme.status import Generic, NvmeStatus


class CommandFailed(Exception):
    """Complete the command being executed with `status` (an NvmeStatus, an (sct, sc) pair or a
    status enum member). `dnr` defaults to True: the emulator sets Do Not Retry on every error a
    retry cannot fix, as QEMU does."""

    def __init__(self, status, dnr=True, why=""):
        self.status = NvmeStatus.of(status)
        if dnr and not self.status.dnr:
            self.status = NvmeStatus(self.status.sct, self.status.sc, True, self.status.more,
                                     self.status.crd)
        self.why = why
        super().__init__(f"{self.status}{': ' + why if why else ''}")


class DmaFault(CommandFailed):
    """A DMA to or from an IOVA that no registered region maps (what an IOMMU reports). The
    command fails with Data Transfer Error, DNR clear."""

    def __init__(self, iova, length, write):
        self.iova = iova
        self.length = length
        self.write = write
        super().__init__(Generic.DATA_TRANSFER_ERROR, dnr=False,
                         why=f"DMA {'write to' if write else 'read from'} unmapped IOVA "
                             f"0x{iova:x}+{length}")
