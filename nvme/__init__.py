"""nvme: a polled, user-space NVMe driver on the env layer.

    import nvme
    ctrlr = nvme.attach("0000:00:10.0")          # or "trtype:PCIe traddr:0000:00:10.0"
    ns = ctrlr.namespace(1)
    qpair = ctrlr.create_io_qpair()              # owned by this thread
    ns.read_sync(qpair, buf, lba=0, nblocks=8)   # or ns.read(..., cb) + qpair.process_completions()
    ctrlr.detach()                               # clean shutdown; the kernel driver gets it back

`connect("trtype:TCP adrfam:IPv4 traddr:10.0.0.2 trsvcid:4420 subnqn:nqn...")` reaches a
controller over NVMe/TCP instead (`nvme.fabrics`; `is_tcp(trid)` tells the two kinds of transport
ID apart), and `nvme.discovery.discover(...)` reads a discovery controller's log page.

`attach` takes the PCI function from the kernel (vfio-pci with an IOMMU, or uio_pci_generic),
brings the controller up and returns an `nvme.controller.Controller`. `probe()` lists the NVMe
functions of this machine. An in-process emulated controller for tests lives in `nvme.emu`.
"""


def probe(root="/sys"):
    """The NVMe PCI functions of this machine (env.pci.PciDevice), with their current drivers."""
    from env.device import probe_pci
    return probe_pci(root=root)


def attach(trid, options=None, *, driver="auto", name=None):
    """Take the NVMe controller at `trid` (a PCI address or an SPDK transport id string) from its
    kernel driver and bring it up. `driver`: "auto", "vfio" or "uio". A PCI function whose class
    is not NVMe (01 08 02), or one this process has attached already, is refused (PciError)
    before anything is unbound or bound."""
    from env.device import attach_pci
    from env.pci import NVME_CLASS, PciAddress, parse_trid
    from nvme.controller import Controller
    from nvme.transport import PcieTransport

    address = parse_trid(trid) if "traddr" in str(trid) else PciAddress.parse(trid)
    # a function of another class (a NIC, a bridge) is refused before it is unbound from anything
    handle = attach_pci(address, driver=driver, class_code=NVME_CLASS)
    try:
        ctrlr = Controller(PcieTransport(handle), options, name=name or str(address))
        return ctrlr.init()
    except BaseException:
        handle.detach(restore_driver=True)
        raise


def is_tcp(trid):
    """Is `trid` an NVMe/TCP transport ID (a string with trtype:TCP, a dict, a TransportId)?"""
    if isinstance(trid, dict):
        return str(trid.get("trtype")).upper() == "TCP"
    if not isinstance(trid, str):
        return type(trid).__name__ == "TransportId"
    return any(t.lower() == "trtype:tcp" for t in trid.split())


def connect(trid, options=None, *, name=None):
    """Connect to an NVMe/TCP controller (`trid`: "trtype:TCP adrfam:IPv4 traddr:... trsvcid:4420
    subnqn:...", a dict or an nvme.fabrics.TransportId) and bring it up: an
    nvme.fabrics.TcpController. `options`: nvme.fabrics.FabricsOptions or a dict of its fields."""
    from nvme.fabrics import connect as _connect
    return _connect(trid, options, name=name)
