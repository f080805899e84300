"""NVMe over Fabrics discovery: the Discovery Log Page (Base spec, log identifier 70h) of a
discovery controller, read over NVMe/TCP (what `nvme discover` does).

    from nvme.discovery import discover
    log = discover("trtype:TCP adrfam:IPv4 traddr:10.0.0.2 trsvcid:4420")
    for e in log.entries:
        print(e.subnqn, e.traddr, e.trsvcid)
    print(log.format_text())           # nvme discover's text; log.to_dict() its JSON
"""
import struct

import attrs

from nvme.errors import DataFormatError

LID_DISCOVERY = 0x70
HEADER_SIZE = ENTRY_SIZE = 1024
_HEADER = struct.Struct("<QQH")           # GENCTR, NUMREC, RECFMT
_ENTRY = struct.Struct("<BBBBHHHH")       # TRTYPE ADRFAM SUBTYPE TREQ PORTID CNTLID ASQSZ EFLAGS

TRTYPES = {1: "rdma", 2: "fc", 3: "tcp", 254: "loop"}
ADRFAMS = {0: "unrecognized", 1: "ipv4", 2: "ipv6", 3: "ib", 4: "fc", 254: "loop"}
SUBTYPES = {1: "discovery subsystem referral", 2: "nvme subsystem",
            3: "current discovery subsystem"}
SECURE_CHANNEL = {0: "not specified", 1: "required", 2: "not required"}
SECTYPES = {0: "none", 1: "tls12", 2: "tls13"}


def _field(raw, off, n):
    """An ASCII field, NUL- and space-terminated (TRSVCID, SUBNQN, TRADDR)."""
    return raw[off:off + n].split(b"\0", 1)[0].decode("ascii", errors="replace").strip()


@attrs.define
class DiscoveryEntry:
    """One Discovery Log Page Entry (1024 bytes)."""
    trtype: int
    adrfam: int
    subtype: int
    treq: int
    portid: int
    cntlid: int
    asqsz: int
    eflags: int
    trsvcid: str
    subnqn: str
    traddr: str
    sectype: int

    @classmethod
    def parse(cls, raw):
        if len(raw) < ENTRY_SIZE:
            raise DataFormatError(f"a discovery log entry is {ENTRY_SIZE} bytes, not {len(raw)}")
        trtype, adrfam, subtype, treq, portid, cntlid, asqsz, eflags = _ENTRY.unpack_from(raw)
        return cls(trtype=trtype, adrfam=adrfam, subtype=subtype, treq=treq, portid=portid,
                   cntlid=cntlid, asqsz=asqsz, eflags=eflags, trsvcid=_field(raw, 32, 32),
                   subnqn=_field(raw, 256, 256), traddr=_field(raw, 512, 256),
                   sectype=raw[768] if trtype == 3 else 0)

    @property
    def treq_text(self):
        text = SECURE_CHANNEL.get(self.treq & 3, "reserved")
        if self.treq & 4:
            text += ", sq flow control disable supported"
        return text

    @property
    def eflags_text(self):
        flags = [name for bit, name in ((1, "duplicate discovery information"),
                                        (2, "explicit discovery connections"),
                                        (4, "no cdc connectivity")) if self.eflags & bit]
        return ", ".join(flags) or "none"

    def to_dict(self):
        """nvme-cli's JSON record (`nvme discover -o json`)."""
        return {"trtype": TRTYPES.get(self.trtype, "unrecognized"),
                "adrfam": ADRFAMS.get(self.adrfam, "unrecognized"),
                "subtype": SUBTYPES.get(self.subtype, "unrecognized"),
                "treq": self.treq_text, "portid": self.portid, "trsvcid": self.trsvcid,
                "subnqn": self.subnqn, "traddr": self.traddr, "eflags": self.eflags_text,
                "sectype": SECTYPES.get(self.sectype, "unrecognized")}

    @property
    def trid(self):
        """This entry as an SPDK transport ID string (TCP entries)."""
        fam = {1: "IPv4", 2: "IPv6"}.get(self.adrfam, "IPv4")
        return (f"trtype:TCP adrfam:{fam} traddr:{self.traddr} trsvcid:{self.trsvcid} "
                f"subnqn:{self.subnqn}")


@attrs.define
class DiscoveryLog:
    genctr: int
    numrec: int
    recfmt: int
    entries: list

    @classmethod
    def parse(cls, data):
        if len(data) < HEADER_SIZE:
            raise DataFormatError(f"the discovery log page header is {HEADER_SIZE} bytes, not "
                                  f"{len(data)}")
        genctr, numrec, recfmt = _HEADER.unpack_from(data)
        have = (len(data) - HEADER_SIZE) // ENTRY_SIZE
        if numrec > have:
            raise DataFormatError(f"the discovery log page says {numrec} records but holds "
                                  f"{have}")
        entries = [DiscoveryEntry.parse(data[HEADER_SIZE + i * ENTRY_SIZE:
                                             HEADER_SIZE + (i + 1) * ENTRY_SIZE])
                   for i in range(numrec)]
        return cls(genctr=genctr, numrec=numrec, recfmt=recfmt, entries=entries)

    def to_dict(self):
        return {"genctr": self.genctr, "records": [e.to_dict() for e in self.entries]}

    def format_text(self):
        """Like `nvme discover`'s output."""
        out = [f"Discovery Log Number of Records {self.numrec}, Generation counter "
               f"{self.genctr}"]
        for i, e in enumerate(self.entries):
            d = e.to_dict()
            out.append(f"=====Discovery Log Entry {i}======")
            for key in ("trtype", "adrfam", "subtype", "treq", "portid", "trsvcid", "subnqn",
                        "traddr", "eflags", "sectype"):
                out.append(f"{key + ':':<8} {d[key]}")
        return "\n".join(out)


def read_log(ctrlr, attempts=5):
    """The whole Discovery Log Page of a connected discovery controller: the header first for
    the number of records, then everything, again if the generation counter moved meanwhile."""
    for _ in range(attempts):
        genctr, numrec, _ = _HEADER.unpack_from(
            ctrlr.get_log_page(LID_DISCOVERY, HEADER_SIZE, nsid=0))
        if numrec > 4096:
            raise DataFormatError(f"the discovery log page claims {numrec} records")
        data = ctrlr.get_log_page(LID_DISCOVERY, HEADER_SIZE + numrec * ENTRY_SIZE, nsid=0)
        log = DiscoveryLog.parse(data)
        if log.genctr == genctr:
            return log
    raise DataFormatError(f"the discovery log page kept changing ({attempts} reads)")


def discover(trid, options=None, *, name=None):
    """Connect to the discovery controller at `trid` (subnqn defaults to the discovery NQN),
    read its log page, disconnect; returns a DiscoveryLog."""
    from nvme.fabrics import NQN_DISCOVERY, TransportId, connect
    tid = TransportId.coerce(trid)
    if tid.subnqn != NQN_DISCOVERY:
        tid = attrs.evolve(tid, subnqn=NQN_DISCOVERY)
    ctrlr = connect(tid, options, name=name)
    try:
        return read_log(ctrlr)
    finally:
        ctrlr.detach()
