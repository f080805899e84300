"""A tiny NVMe host driver for testing the emulated controller at register and memory level.

It does what /work/shared/testbed/probe_vfio.py does against QEMU, in plain Python and on purpose
independent of the real driver (nvme.qpair / nvme.controller): set AQA/ASQ/ACQ, enable, submit
64-byte entries into submission queues in DMA memory, ring doorbells (MMIO, or shadow doorbells
with the EventIdx test), and reap 16-byte completions by their phase tag. PRP lists (chained
when they cross a page) and SGL segments are built here by hand.
"""
import struct

from env import memory
from nvme import spec
from nvme.spec import Command, Completion, SglDescriptor, SglType

PAGE = 4096


def need_event(event_idx, new, old):
    """The virtio-style test of shadow doorbells (Base 5.11 Doorbell Buffer Config; Linux
    nvme_dbbuf_need_event)."""
    return (new - event_idx - 1) & 0xFFFF < (new - old) & 0xFFFF


class QueuePair:
    def __init__(self, drv, qid, depth, cq_depth=None):
        self.drv = drv
        self.qid = qid
        self.depth = depth
        self.cq_depth = cq_depth or depth
        self.sq = drv.dma(depth * 64)
        self.cq = drv.dma(self.cq_depth * 16)
        self.sq_tail = 0
        self.rung_tail = 0
        self.cq_head = 0
        self.rung_head = 0
        self.phase = 1
        self.next_cid = 0
        self.done = {}                  # cid -> Completion, reaped but not yet claimed
        self.reaped = []                # every completion, in order

    def place(self, cmd):
        """Write `cmd` at the tail (a fresh CID unless it has one) without ringing."""
        if cmd.cid == 0:
            self.next_cid = (self.next_cid + 1) & 0xFFFF or 1
            cmd.cid = self.next_cid
        cmd.pack_into(memoryview(self.sq), self.sq_tail * 64)
        self.sq_tail = (self.sq_tail + 1) % self.depth
        return cmd.cid

    def ring_sq(self):
        self.drv.ring(self.qid, False, self.sq_tail, self.rung_tail)
        self.rung_tail = self.sq_tail

    def submit(self, cmd):
        cid = self.place(cmd)
        self.ring_sq()
        return cid

    def peek(self):
        """The CQE at the head, whatever its phase."""
        return Completion.unpack(bytes(memoryview(self.cq)[self.cq_head * 16:
                                                          self.cq_head * 16 + 16]))

    def reap(self, ring=True):
        got = []
        while True:
            cqe = self.peek()
            if cqe.phase != self.phase:
                break
            got.append(cqe)
            self.cq_head += 1
            if self.cq_head == self.cq_depth:
                self.cq_head = 0
                self.phase ^= 1
        if got and ring:
            self.ring_cq()
        for cqe in got:
            self.done[cqe.cid] = cqe
        self.reaped += got
        return got

    def ring_cq(self):
        self.drv.ring(self.qid, True, self.cq_head, self.rung_head)
        self.rung_head = self.cq_head

    def wait(self, cid):
        """The completion of `cid` (everything is synchronous: it is there or it never comes)."""
        if cid not in self.done:
            self.reap()
        assert cid in self.done, f"no completion for cid {cid} on queue {self.qid}"
        return self.done.pop(cid)

    def run(self, cmd):
        return self.wait(self.submit(cmd))


class MiniDriver:
    def __init__(self, emu):
        self.emu = emu
        self.t = emu.transport
        self.cap = spec.Cap.decode(self.t.read64(spec.REG_CAP))
        self.buffers = []
        self.admin_q = None
        self.shadow = None          # shadow doorbell and EventIdx DMA buffers
        self.eventidx = None
        self.use_shadow = False
        self.shadow_admin = False   # also use the admin queue's shadow doorbells (as libvfn)
        self.mmio_rings = 0

    # ---- memory -------------------------------------------------------------------------------
    def dma(self, size, align=PAGE):
        buf = memory.allocate(max(size, 1), align, zero=True)
        self.buffers.append(buf)
        return buf

    # ---- registers and doorbells -------------------------------------------------------------
    def db_offset(self, qid, cq):
        return (2 * qid + (1 if cq else 0)) * self.cap.doorbell_stride

    def ring(self, qid, cq, value, old):
        if self.use_shadow and (qid != 0 or self.shadow_admin):
            off = self.db_offset(qid, cq)
            struct.pack_into("<I", memoryview(self.shadow), off, value)
            event = struct.unpack_from("<I", memoryview(self.eventidx), off)[0]
            if not need_event(event, value, old):
                return
        self.mmio_rings += 1
        self.t.regs.w32(spec.REG_DOORBELL_BASE + self.db_offset(qid, cq), value)
        self.t.doorbell_written(qid, cq)

    def csts(self):
        return spec.Csts.decode(self.t.read32(spec.REG_CSTS))

    def wait_ready(self, want, reads=100):
        for _ in range(reads):
            if self.csts().rdy == want:
                return True
        return False

    def enable(self, admin_depth=16, cc=None):
        self.t.write32(spec.REG_CC, 0)
        assert self.wait_ready(False)
        self.admin_q = QueuePair(self, 0, admin_depth)
        self.t.write32(spec.REG_AQA, spec.Aqa(admin_depth, admin_depth).encode())
        self.t.write64(spec.REG_ASQ, self.admin_q.sq.iova)
        self.t.write64(spec.REG_ACQ, self.admin_q.cq.iova)
        cc = cc or spec.Cc(en=True, iosqes=6, iocqes=4)
        self.t.write32(spec.REG_CC, cc.encode())
        return self.wait_ready(True)

    def disable(self):
        self.t.write32(spec.REG_CC, 0)
        self.use_shadow = False
        return self.wait_ready(False)

    # ---- admin ---------------------------------------------------------------------------------
    def admin(self, cmd):
        return self.admin_q.run(cmd)

    def admin_ok(self, cmd):
        cpl = self.admin(cmd)
        assert cpl.nvme_status.ok, f"{spec.opcode_name(cmd.opc, True)}: {cpl.nvme_status}"
        return cpl

    def identify(self, cns, nsid=0):
        buf = self.dma(4096)
        cpl = self.admin(Command(opc=spec.ADM_IDENTIFY, nsid=nsid, prp1=buf.iova, cdw10=cns))
        return cpl, bytes(memoryview(buf))

    def set_features(self, fid, cdw11=0, cdw10_extra=0, prp1=0):
        return self.admin(Command(opc=spec.ADM_SET_FEATURES, cdw10=fid | cdw10_extra,
                                  cdw11=cdw11, prp1=prp1))

    def get_features(self, fid, sel=0, cdw11=0, nsid=0, prp1=0):
        return self.admin(Command(opc=spec.ADM_GET_FEATURES, nsid=nsid, cdw10=fid | sel << 8,
                                  cdw11=cdw11, prp1=prp1))

    def get_log_page(self, lid, nbytes, offset=0, nsid=0xFFFFFFFF, rae=False):
        buf = self.dma(max(nbytes, 4096))
        numd = nbytes // 4 - 1
        cpl = self.admin(Command(opc=spec.ADM_GET_LOG_PAGE, nsid=nsid, prp1=buf.iova,
                                 prp2=self.prp2_for(buf, nbytes),
                                 cdw10=lid | int(rae) << 15 | (numd & 0xFFFF) << 16,
                                 cdw11=numd >> 16, cdw12=offset & 0xFFFFFFFF,
                                 cdw13=offset >> 32))
        return cpl, bytes(memoryview(buf)[:nbytes])

    def prp2_for(self, buf, nbytes):
        return self.prps(buf, 0, nbytes)[1]

    def create_cq(self, qid, depth, base, pc=True, iv=0, ien=False):
        return self.admin(Command(opc=spec.ADM_CREATE_CQ, prp1=base,
                                  cdw10=(depth - 1) << 16 | qid,
                                  cdw11=iv << 16 | int(ien) << 1 | int(pc)))

    def create_sq(self, qid, depth, base, cqid, pc=True):
        return self.admin(Command(opc=spec.ADM_CREATE_SQ, prp1=base,
                                  cdw10=(depth - 1) << 16 | qid, cdw11=cqid << 16 | int(pc)))

    def create_io_qpair(self, qid, depth=16, cq_depth=None):
        qp = QueuePair(self, qid, depth, cq_depth)
        assert self.create_cq(qid, qp.cq_depth, qp.cq.iova).nvme_status.ok
        assert self.create_sq(qid, depth, qp.sq.iova, qid).nvme_status.ok
        if self.use_shadow:
            for cq in (False, True):
                struct.pack_into("<I", memoryview(self.shadow), self.db_offset(qid, cq), 0)
        return qp

    def delete_io_qpair(self, qp):
        sq = self.admin(Command(opc=spec.ADM_DELETE_SQ, cdw10=qp.qid))
        cq = self.admin(Command(opc=spec.ADM_DELETE_CQ, cdw10=qp.qid))
        return sq, cq

    def enable_shadow_doorbells(self):
        self.shadow = self.dma(PAGE)
        self.eventidx = self.dma(PAGE)
        cpl = self.admin(Command(opc=spec.ADM_DOORBELL_BUFFER_CONFIG, prp1=self.shadow.iova,
                                 prp2=self.eventidx.iova))
        if cpl.nvme_status.ok:
            self.use_shadow = True
        return cpl

    # ---- data pointers -------------------------------------------------------------------------
    def prps(self, buf, offset, length, page=PAGE):
        """(prp1, prp2) for `length` bytes at `offset` in `buf`, with PRP lists (chained across
        list pages) when the data spans more than two pages."""
        start = buf.iova + offset
        prp1 = start
        first = min(length, page - (start % page))
        rest = length - first
        if rest <= 0:
            return prp1, 0
        pages = [start + first + i * page for i in range(-(-rest // page))]
        if len(pages) == 1:
            return prp1, pages[0]
        per_list = page // 8
        lists = []
        remaining = pages
        while remaining:
            if len(remaining) <= per_list:
                lists.append(list(remaining))
                remaining = []
            else:
                lists.append(list(remaining[:per_list - 1]))
                remaining = remaining[per_list - 1:]
        list_bufs = [self.dma(page) for _ in lists]
        for i, (entries, lb) in enumerate(zip(lists, list_bufs)):
            if i + 1 < len(lists):
                entries = entries + [list_bufs[i + 1].iova]
            struct.pack_into(f"<{len(entries)}Q", memoryview(lb), 0, *entries)
        return prp1, list_bufs[0].iova

    def sgl_segment(self, descriptors):
        """A DMA buffer holding these SglDescriptors; returns (iova, length)."""
        seg = self.dma(16 * len(descriptors))
        view = memoryview(seg)
        for i, d in enumerate(descriptors):
            view[16 * i:16 * i + 16] = d.pack()
        return seg.iova, 16 * len(descriptors)

    # ---- I/O -------------------------------------------------------------------------------------
    def io_cmd(self, opc, nsid, slba, nlb, buf=None, offset=0, length=None, sgl=None, cdw12=0,
               block_size=512):
        """An NVM command on `nlb` blocks; data at `offset` in `buf` by PRPs, or `sgl` (an
        SglDescriptor for DPTR) with PSDT 01b."""
        cmd = Command(opc=opc, nsid=nsid, cdw10=slba & 0xFFFFFFFF, cdw11=slba >> 32,
                      cdw12=((nlb - 1) & 0xFFFF) | cdw12)
        if sgl is not None:
            cmd.flags = spec.PSDT_SGL_MPTR_CONTIG
            cmd.prp1, cmd.prp2 = sgl.as_dptr()
        elif buf is not None:
            length = nlb * block_size if length is None else length
            cmd.prp1, cmd.prp2 = self.prps(buf, offset, length)
        return cmd


def data_block(buf, offset, length):
    return SglDescriptor(buf.iova + offset, length, SglType.DATA_BLOCK)
