# NVMe wire formats and register map as C declarations (NVMe Base Specification 2.0, and the
# NVM Command Set Specification 1.0 for I/O commands). The Python-side names and decoders live in
# nvme/spec.py; keep the two in step.
from libc.stdint cimport uint8_t, uint16_t, uint32_t, uint64_t

# ---- controller registers (Base spec 3.1.3, "Controller Properties") ---------------------------
cdef enum:
    REG_CAP = 0x00        # Controller Capabilities (64-bit)
    REG_VS = 0x08         # Version
    REG_INTMS = 0x0C
    REG_INTMC = 0x10
    REG_CC = 0x14         # Controller Configuration
    REG_CSTS = 0x1C       # Controller Status
    REG_NSSR = 0x20
    REG_AQA = 0x24        # Admin Queue Attributes
    REG_ASQ = 0x28        # Admin SQ base (64-bit)
    REG_ACQ = 0x30        # Admin CQ base (64-bit)
    REG_CMBLOC = 0x38
    REG_CMBSZ = 0x3C
    REG_DOORBELL_BASE = 0x1000   # SQ y tail doorbell at 0x1000 + (2y) * (4 << CAP.DSTRD)

cdef enum:
    CC_EN = 1 << 0
    CC_SHN_MASK = 3 << 14
    CC_SHN_NORMAL = 1 << 14
    CC_SHN_ABRUPT = 2 << 14
    CSTS_RDY = 1 << 0
    CSTS_CFS = 1 << 1
    CSTS_SHST_MASK = 3 << 2
    CSTS_SHST_COMPLETE = 2 << 2

# ---- opcodes (Base spec 5, NVM Command Set spec 3) --------------------------------------------
cdef enum:
    ADM_DELETE_SQ = 0x00
    ADM_CREATE_SQ = 0x01
    ADM_GET_LOG_PAGE = 0x02
    ADM_DELETE_CQ = 0x04
    ADM_CREATE_CQ = 0x05
    ADM_IDENTIFY = 0x06
    ADM_ABORT = 0x08
    ADM_SET_FEATURES = 0x09
    ADM_GET_FEATURES = 0x0A
    ADM_ASYNC_EVENT_REQUEST = 0x0C
    ADM_KEEP_ALIVE = 0x18
    ADM_DOORBELL_BUFFER_CONFIG = 0x7C
    ADM_FORMAT_NVM = 0x80

    NVM_FLUSH = 0x00
    NVM_WRITE = 0x01
    NVM_READ = 0x02
    NVM_WRITE_UNCORRECTABLE = 0x04
    NVM_COMPARE = 0x05
    NVM_WRITE_ZEROES = 0x08
    NVM_DATASET_MANAGEMENT = 0x09

# ---- status (Base spec 4.2.3: the 15-bit status field above the phase bit) ----------------------
cdef enum:
    SCT_GENERIC = 0
    SCT_COMMAND_SPECIFIC = 1
    SCT_MEDIA = 2
    SCT_PATH = 3
    SCT_VENDOR = 7
    SC_SUCCESS = 0x00
    SC_INVALID_OPCODE = 0x01
    SC_INVALID_FIELD = 0x02
    SC_DATA_TRANSFER_ERROR = 0x04
    SC_ABORTED_POWER_LOSS = 0x05
    SC_INTERNAL_DEVICE_ERROR = 0x06
    SC_ABORTED_BY_REQUEST = 0x07
    SC_ABORTED_SQ_DELETION = 0x08
    SC_LBA_OUT_OF_RANGE = 0x80
    SC_COMPARE_FAILURE = 0x85      # media errors (SCT 2)

# ---- command and completion entries -----------------------------------------------------------
# 64-byte Submission Queue Entry (Base spec 4.2, figure "Common Command Format").
cdef packed struct nvme_sqe:
    uint8_t opc
    uint8_t flags            # bits 1:0 FUSE, bits 7:6 PSDT (0 = PRPs, 1 = SGL for data)
    uint16_t cid
    uint32_t nsid
    uint32_t cdw2
    uint32_t cdw3
    uint64_t mptr
    uint64_t prp1            # or the first half of the SGL descriptor (SGL1)
    uint64_t prp2            # or its second half
    uint32_t cdw10
    uint32_t cdw11
    uint32_t cdw12
    uint32_t cdw13
    uint32_t cdw14
    uint32_t cdw15

# 16-byte Completion Queue Entry (Base spec 4.6).
cdef packed struct nvme_cqe:
    uint32_t cdw0
    uint32_t cdw1
    uint16_t sqhd            # SQ head pointer: how far the controller has consumed the SQ
    uint16_t sqid
    uint16_t cid
    uint16_t status          # bit 0 phase tag, bits 8:1 SC, 11:9 SCT, 13:12 CRD, 14 M, 15 DNR

# 16-byte SGL descriptor (Base spec 4.3.2).
cdef packed struct nvme_sgl_desc:
    uint64_t address
    uint32_t length
    uint8_t reserved[3]
    uint8_t id               # bits 7:4 descriptor type, 3:0 subtype

cdef enum:
    PSDT_PRP = 0x00
    PSDT_SGL_MPTR_CONTIG = 0x40
    SGL_TYPE_DATA_BLOCK = 0x00
    SGL_TYPE_SEGMENT = 0x20
    SGL_TYPE_LAST_SEGMENT = 0x30

cdef inline uint16_t status_code(uint16_t status) noexcept nogil:
    """SCT and SC as one value: (SCT << 8) | SC."""
    return (status >> 1) & 0x7FF

cdef inline bint status_is_error(uint16_t status) noexcept nogil:
    return (status >> 1) & 0x7FF != 0
