"""What the driver refuses at attach rather than later, and what it never leaks on an error path.

- ControllerOptions: every field is checked when the options are made or changed, with an
  `InvalidOption` naming it (a bad `io_timeout_s` used to be accepted and to fail at each queue
  pair creation, leaking an I/O queue every time).
- I/O queue creation: whatever fails while a queue pair is made (the controller refusing Create
  I/O CQ or SQ, a bad timeout found after the queues exist), the queue id is free again and
  nothing stays created on the controller.
- One driver per controller in a process: the same emulated controller (its transport) attached
  twice, through the driver or through the NVMe bdev module, is refused while the first lives.
- A PCI function that is not NVMe is refused before anything is unbound (see also
  tests/env/test_device.py for the fake-sysfs version).
"""
import math
import os

import pytest

from bdev import nvme as bdev_nvme
from env.errors import InvalidArgument, PciError
from env.memory import allocate
from env.thread import current_thread
from nvme.controller import Controller, ControllerOptions
from nvme.emu import EmulatedController, EmuNamespace
from nvme.errors import AlreadyAttached, ControllerError, InvalidOption
from nvme.spec import AdminOpcode
from nvme.status import Generic
from tests.nvme.test_driver import make_rig  # noqa: F401  (fixture)

BAD_OPTIONS = [
    ("io_timeout_s", -1), ("io_timeout_s", math.nan), ("io_timeout_s", "5"),
    ("io_timeout_s", math.inf), ("io_timeout_s", True), ("io_timeout_s", 1e12),
    ("admin_timeout_s", 0), ("admin_timeout_s", -0.5), ("admin_timeout_s", math.nan),
    ("admin_timeout_s", None), ("abort_timeout_s", 0), ("abort_timeout_s", math.inf),
    ("abort_timeout_s", "1"), ("io_queue_size", 1), ("io_queue_size", 65537),
    ("io_queue_size", 64.0), ("io_queue_size", "64"), ("io_queue_size", True),
    ("admin_queue_size", 1), ("admin_queue_size", 5000), ("io_queue_requests", 0),
    ("io_queue_requests", -8), ("io_queue_requests", 1.5), ("num_io_queues", 0),
    ("num_io_queues", 65536), ("num_io_queues", None), ("shadow_doorbells", 1),
    ("shadow_doorbells", "yes"), ("sgl", "sometimes"), ("sgl", True), ("aer_count", -1),
    ("aer_count", 257), ("async_event_config", -1), ("async_event_config", 1 << 32),
]


def queues_in_use(emu):
    """I/O queues (SQ, CQ ids) the emulated controller has now."""
    return sorted(q for q in emu.sqs if q), sorted(q for q in emu.cqs if q)


# ---- options ----------------------------------------------------------------------------------
@pytest.mark.parametrize("field,value", BAD_OPTIONS)
def test_bad_option_is_refused_where_it_is_written(field, value):
    with pytest.raises(InvalidOption, match=rf"ControllerOptions\.{field} must be") as ei:
        ControllerOptions(**{field: value})
    assert ei.value.option == field and ei.value.value is value
    assert isinstance(ei.value, InvalidArgument)
    opts = ControllerOptions()
    with pytest.raises(InvalidOption, match=rf"ControllerOptions\.{field}"):
        setattr(opts, field, value)
    assert getattr(opts, field) == getattr(ControllerOptions(), field)     # unchanged


def test_good_options_are_taken():
    opts = ControllerOptions(io_timeout_s=0, abort_timeout_s=0.5, io_queue_size=2,
                             io_queue_requests=None, num_io_queues=1, sgl="never",
                             shadow_doorbells=False, aer_count=0, admin_timeout_s=1)
    opts.io_timeout_s = 2.5
    assert opts.io_timeout_s == 2.5


@pytest.mark.parametrize("value", [-1, math.nan, "5"])
def test_bdev_attach_refuses_a_bad_io_timeout_before_attaching(value):
    emu = EmulatedController([EmuNamespace(1024)], name="emu-badopt")
    with pytest.raises(InvalidOption, match="io_timeout_s"):
        bdev_nvme.attach_emulated("NvmeBadOpt", emu, options={"io_timeout_s": value})
    with pytest.raises(InvalidOption, match="io_timeout_s"):
        bdev_nvme.attach_emulated("NvmeBadOpt", emu, options=_unchecked(io_timeout_s=value))
    assert "NvmeBadOpt" not in [c.name for c in bdev_nvme.controllers()]
    assert emu.counters["enables"] == 0                 # the controller was never touched


def _unchecked(**fields):
    """ControllerOptions whose fields were forced past the validators (object.__setattr__)."""
    opts = ControllerOptions()
    for k, v in fields.items():
        object.__setattr__(opts, k, v)
    return opts


def test_controller_validates_options_it_is_given():
    emu = EmulatedController([EmuNamespace(64)])
    with pytest.raises(InvalidOption, match="io_timeout_s"):
        Controller(emu.transport, _unchecked(io_timeout_s="5"))
    with pytest.raises(InvalidArgument, match="ControllerOptions"):
        Controller(emu.transport, {"io_timeout_s": 5})


def test_too_few_requests_for_the_queue_is_refused_at_attach():
    emu = EmulatedController([EmuNamespace(64)], mqes=63)
    c = Controller(emu.transport, ControllerOptions(io_queue_size=64, io_queue_requests=16))
    with pytest.raises(InvalidOption, match="io_queue_requests must be at least 55"):
        c.init()
    assert emu.counters["enables"] == 0
    ok = Controller(emu.transport, ControllerOptions(io_queue_size=64, io_queue_requests=55))
    ok.init()                                           # the failed one let go of the transport
    ok.detach()


# ---- no queue leaks on error paths -----------------------------------------------------------
def test_failed_queue_creations_leak_nothing(make_rig):
    r = make_rig(qsize=None, max_ioqpairs=4, opts=ControllerOptions(io_timeout_s=0,
                                                                    num_io_queues=4))
    c, emu = r.ctrl, r.emu
    assert c.num_io_queues == 4
    for _ in range(3 * c.num_io_queues):
        emu.inject(AdminOpcode.CREATE_IO_SQ, admin=True, status=Generic.INTERNAL_ERROR)
        with pytest.raises(Exception, match="Internal"):
            c.create_io_qpair(8)
        emu.inject(AdminOpcode.CREATE_IO_CQ, admin=True, status=Generic.INTERNAL_ERROR)
        with pytest.raises(Exception, match="Internal"):
            c.create_io_qpair(8)
        with pytest.raises(InvalidArgument):              # refused by the queue pair itself
            c.create_io_qpair(8, requests=2)
    # a failure after the queues exist on the controller: the timeout (forced past the checks)
    object.__setattr__(c.options, "io_timeout_s", math.nan)
    for _ in range(3 * c.num_io_queues):
        with pytest.raises(Exception) as ei:
            c.create_io_qpair(8)
        assert queues_in_use(emu) == ([], []) and len(c._free_qids) == 4, ei.value
        assert isinstance(ei.value, InvalidArgument) and "timeout" in str(ei.value)
    object.__setattr__(c.options, "io_timeout_s", 0)
    assert queues_in_use(emu) == ([], []) and c.qpairs == {}
    qps = [c.create_io_qpair(8) for _ in range(c.num_io_queues)]     # every queue is still there
    assert sorted(q.qid for q in qps) == [1, 2, 3, 4]
    buf = allocate(4096)
    for qp in qps:
        r.ns.read_sync(qp, buf, 0, 8)
    with pytest.raises(ControllerError, match="all 4 I/O queues are in use"):
        c.create_io_qpair(8)


def test_failed_channel_setups_through_the_bdev_leak_no_queue():
    emu = EmulatedController([EmuNamespace(1024)], name="emu-chleak", max_ioqpairs=2)
    bdev_nvme.attach_emulated("NvmeLeak", emu, options={"io_timeout_s": 0, "num_io_queues": 2})
    import bdev
    nc = bdev_nvme.get_controller("NvmeLeak")
    desc = bdev.open_bdev("NvmeLeakn1", write=True)
    try:
        for _ in range(10):
            emu.inject(AdminOpcode.CREATE_IO_SQ, admin=True, status=Generic.INTERNAL_ERROR)
            with pytest.raises(Exception, match="Internal"):
                desc.get_io_channel()
        # after the queues exist (the timeout forced past the checks): the bug's own path
        object.__setattr__(nc.ctrlr.options, "io_timeout_s", math.nan)
        for _ in range(10):
            with pytest.raises(Exception) as ei:
                desc.get_io_channel()
            assert queues_in_use(emu) == ([], []), ei.value
            assert isinstance(ei.value, InvalidArgument) and "timeout" in str(ei.value)
        object.__setattr__(nc.ctrlr.options, "io_timeout_s", 0)
        assert queues_in_use(emu) == ([], []) and nc.channel_count == 0
        ch = desc.get_io_channel()
        desc.write_sync(ch, bytes(4096), 0)
        ch.put()
    finally:
        desc.close()
        bdev_nvme.detach_controller("NvmeLeak")
        t = current_thread()
        t.run_until(lambda: nc.state == "detached", timeout=20)


# ---- one driver per controller ----------------------------------------------------------------
def test_a_second_controller_over_one_transport_is_refused():
    emu = EmulatedController([EmuNamespace(64)], name="emu-twice")
    first = Controller(emu.transport, ControllerOptions(io_timeout_s=0), name="first").init()
    enables = emu.counters["enables"]
    second = Controller(emu.transport, ControllerOptions(io_timeout_s=0), name="second")
    with pytest.raises(AlreadyAttached, match="emu-twice is already attached as first") as ei:
        second.init()
    assert ei.value.owner == "first"
    assert emu.counters["enables"] == enables           # the first was not disturbed
    qp = first.create_io_qpair(8)
    first.namespace(1).read_sync(qp, allocate(4096), 0, 8)
    first.detach()
    second.init()                                       # free again once detached
    second.detach()


def test_the_same_emulator_attached_twice_as_bdevs_is_refused():
    emu = EmulatedController([EmuNamespace(1024)], name="emu-dup")
    bdev_nvme.attach_emulated("NvmeDupA", emu, options={"io_timeout_s": 0})
    nc = bdev_nvme.get_controller("NvmeDupA")
    try:
        with pytest.raises(AlreadyAttached, match="already attached as NvmeDupA"):
            bdev_nvme.attach_emulated("NvmeDupB", emu)
        with pytest.raises(AlreadyAttached, match="already attached as NvmeDupA"):
            bdev_nvme.attach_controller("NvmeDupB", trtype="emulated", traddr="emu-dup")
        with pytest.raises(AlreadyAttached, match="already attached as NvmeDupA"):
            bdev_nvme.attach_emulated("NvmeDupB", nc.ctrlr)
        assert [c.name for c in bdev_nvme.controllers() if c.name.startswith("NvmeDup")] == \
            ["NvmeDupA"]
        # the first still works, and was not reset
        import bdev
        d = bdev.open_bdev("NvmeDupAn1", write=True)
        ch = d.get_io_channel()
        d.write_sync(ch, b"\x5a" * 4096, 0)
        out = bytearray(4096)
        d.read_sync(ch, out, 0)
        assert out == b"\x5a" * 4096 and nc.ctrlr.reset_count == 0
        ch.put()
        d.close()
    finally:
        bdev_nvme.detach_controller("NvmeDupA")
        current_thread().run_until(lambda: nc.state == "detached", timeout=20)
    bdev_nvme.attach_emulated("NvmeDupB", emu, options={"io_timeout_s": 0})    # free again
    nb = bdev_nvme.get_controller("NvmeDupB")
    bdev_nvme.detach_controller("NvmeDupB")
    current_thread().run_until(lambda: nb.state == "detached", timeout=20)


# ---- PCI class ---------------------------------------------------------------------------------
def _non_nvme_function():
    root = "/sys/bus/pci/devices"
    try:
        names = sorted(os.listdir(root))
    except OSError:
        return None
    for name in names:
        try:
            with open(f"{root}/{name}/class") as f:
                code = int(f.read(), 16)
        except (OSError, ValueError):
            continue
        if code != 0x010802:
            return name, code
    return None


def test_nvme_attach_refuses_a_function_that_is_not_nvme(monkeypatch):
    """On this machine's real sysfs: the class is read before anything else, so no privilege
    is needed to be refused (and nothing is unbound). Every step that could change the
    machine (module loading, sysfs writes, bind, unbind) is replaced by a failure first, so a
    regression fails here without touching a real device."""
    import nvme
    import env.device
    import env.pci

    def forbidden(*args, **kw):
        raise AssertionError(f"attach went past the class check: {args!r}")

    monkeypatch.setattr(env.device, "load_driver", forbidden)
    monkeypatch.setattr(env.device, "require_hugepages", forbidden)
    monkeypatch.setattr(env.pci.Sysfs, "write", forbidden)
    monkeypatch.setattr(env.pci.Sysfs, "modprobe", forbidden)
    for step in ("bind", "unbind", "restore"):
        monkeypatch.setattr(env.pci.PciDevice, step, forbidden)
    found = _non_nvme_function()
    if found is None:
        pytest.skip(reason="no PCI function other than NVMe in /sys/bus/pci/devices")
    name, code = found
    driver = os.path.realpath(f"/sys/bus/pci/devices/{name}/driver")
    with pytest.raises(PciError, match=rf"{name} has PCI class {code >> 16:02x} "
                                       rf"{(code >> 8) & 0xFF:02x} {code & 0xFF:02x}.* not "
                                       r"01 08 02 \(NVMe\)") as ei:
        nvme.attach(name)
    assert str(ei.value.address) == name
    assert os.path.realpath(f"/sys/bus/pci/devices/{name}/driver") == driver
