"""NS16550A through its registers, as Linux's 8250 driver drives it."""

from __future__ import annotations

import pytest

from pyvirt.devices.base import IrqLine
from pyvirt.devices.uart16550 import (
    HOST_QUEUE_LIMIT,
    IER,
    IIR_FCR,
    LCR,
    LSR,
    MCR,
    MSR,
    RBR_THR,
    SCR,
    Uart16550,
)
from pyvirt.testing.fakes import FakeCharBackend


@pytest.fixture
def uart() -> tuple[Uart16550, IrqLine, FakeCharBackend]:
    irq, be = IrqLine(), FakeCharBackend()
    return Uart16550(irq, be), irq, be


def rd(u: Uart16550, reg: int) -> int:
    return u.read(reg, 1)


def wr(u: Uart16550, reg: int, value: int) -> None:
    u.write(reg, 1, value)


def drain(u: Uart16550) -> bytes:
    out = bytearray()
    while rd(u, LSR) & 0x01:
        out.append(rd(u, RBR_THR))
    return bytes(out)


def test_reset_values(uart) -> None:
    u, irq, _ = uart
    assert [rd(u, r) for r in (IER, IIR_FCR, LCR, MCR, LSR, MSR, SCR)] == [0, 0x01, 0, 0, 0x60, 0xB0, 0]
    assert not irq.level


def test_transmit_goes_to_backend_at_once(uart) -> None:
    u, irq, be = uart
    for ch in b"hi\n":
        wr(u, RBR_THR, ch)
    assert be.output == b"hi\n"
    assert rd(u, LSR) & 0x60 == 0x60              # THRE and TEMT: nothing waits to be sent
    assert not irq.level                          # ETBEI is off


def test_thre_interrupt_semantics(uart) -> None:
    u, irq, be = uart
    wr(u, IER, 0x02)                              # ETBEI with THR empty: THRE pending at once
    assert irq.level and rd(u, IIR_FCR) == 0x02
    assert not irq.level                          # reading IIR with THRE the source clears it
    assert rd(u, IIR_FCR) == 0x01
    wr(u, RBR_THR, ord("a"))                      # THR empties again after the byte goes
    assert irq.level
    wr(u, IER, 0x00)                              # disabling ETBEI drops the request
    assert not irq.level
    wr(u, IER, 0x02)
    assert irq.level
    wr(u, IER, 0x03)                              # ETBEI unchanged: still pending, not re-armed
    assert rd(u, IIR_FCR) == 0x02 and rd(u, IIR_FCR) == 0x01


def test_linux_thre_test_finds_no_bug(uart) -> None:
    """serial8250_do_startup's THRE probe: IIR must show an interrupt both times."""
    u, _, _ = uart
    wr(u, IER, 0x02)
    iir1 = rd(u, IIR_FCR)
    wr(u, IER, 0)
    wr(u, IER, 0x02)
    iir = rd(u, IIR_FCR)
    wr(u, IER, 0)
    assert not iir1 & 1 and not iir & 1


def test_receive_without_fifo(uart) -> None:
    u, irq, be = uart
    be.feed(b"ab")
    assert rd(u, LSR) & 0x01
    assert not irq.level                          # ERBFI off
    wr(u, IER, 0x01)
    assert irq.level and rd(u, IIR_FCR) == 0x04   # data available; no FIFO bits
    assert rd(u, RBR_THR) == ord("a")
    assert irq.level                              # "b" moved into the holding register
    assert rd(u, RBR_THR) == ord("b")
    assert not irq.level and rd(u, IIR_FCR) == 0x01
    assert not rd(u, LSR) & 0x01
    assert rd(u, RBR_THR) == 0                    # empty RBR reads 0


def test_fifo_trigger_level_and_timeout(uart) -> None:
    u, irq, be = uart
    wr(u, IIR_FCR, 0x81)                          # FIFO on, trigger at 8
    wr(u, IER, 0x01)
    be.feed(b"123")
    assert rd(u, IIR_FCR) == 0xCC                 # FIFOs on + character timeout (below trigger)
    be.feed(b"4567890")
    assert rd(u, IIR_FCR) == 0xC4                 # at the trigger level: data available
    assert drain(u) == b"1234567890"
    assert not irq.level


def test_no_input_lost_while_guest_is_slow(uart) -> None:
    u, irq, be = uart
    wr(u, IIR_FCR, 0x01)
    data = bytes(range(256)) * 40
    be.feed(data)                                 # far more than the 16-byte FIFO
    assert drain(u) == data
    assert u.dropped == 0


def test_host_queue_cap(uart) -> None:
    u, _, be = uart
    be.feed(b"x" * (HOST_QUEUE_LIMIT + 100))
    assert u.dropped == 100
    assert len(drain(u)) == HOST_QUEUE_LIMIT


def test_fcr_clears_rx_and_toggle_empties(uart) -> None:
    u, _, be = uart
    wr(u, IIR_FCR, 0x01)
    be.feed(b"a" * 40)
    wr(u, IIR_FCR, 0x03)                          # clear RX FIFO: next 16 come from the host queue
    assert len(drain(u)) == 40 - 16
    be.feed(b"zz")
    wr(u, IIR_FCR, 0x00)                          # FIFO off: both FIFOs emptied
    assert rd(u, IIR_FCR) & 0xC0 == 0
    assert drain(u) == b""


def test_divisor_latch(uart) -> None:
    u, _, be = uart
    wr(u, IER, 0x05)
    wr(u, LCR, 0x83)
    wr(u, RBR_THR, 0x03)
    wr(u, IER, 0x01)
    assert (rd(u, RBR_THR), rd(u, IER)) == (3, 1)
    assert be.output == b""                       # DLL write is not a transmit
    wr(u, LCR, 0x03)
    assert rd(u, IER) == 0x05                     # IER untouched by the DLM write
    wr(u, RBR_THR, ord("k"))
    assert be.output == b"k"


def test_loopback_and_interrupt_priority(uart) -> None:
    u, irq, be = uart
    wr(u, MCR, 0x10)                              # loopback, all modem outputs off
    be.feed(b"host")
    assert not rd(u, LSR) & 0x01                  # host input held back while looped
    wr(u, RBR_THR, ord("1"))
    wr(u, RBR_THR, ord("2"))                      # holding register full: overrun
    assert be.output == b""
    wr(u, IER, 0x0F)
    assert rd(u, IIR_FCR) == 0x06                 # line status first
    assert rd(u, LSR) & 0x03 == 0x03              # OE and DR; reading clears OE
    assert rd(u, IIR_FCR) == 0x04                 # then received data
    assert rd(u, RBR_THR) == ord("1")
    assert rd(u, IIR_FCR) == 0x02                 # then THRE (cleared by this read)
    assert rd(u, IIR_FCR) == 0x00                 # then modem status (deltas from MCR)
    assert rd(u, MSR) & 0x0F                      # reading MSR clears the deltas
    assert rd(u, IIR_FCR) == 0x01 and not irq.level
    wr(u, MCR, 0x00)                              # line reconnected: host input flows again
    assert drain(u) == b"host"


def test_loopback_modem_lines(uart) -> None:
    u, _, _ = uart
    wr(u, MCR, 0x1F)
    assert rd(u, MSR) & 0xF0 == 0xF0              # DTR->DSR, RTS->CTS, OUT1->RI, OUT2->DCD
    wr(u, MCR, 0x1B)                              # OUT1 off: trailing edge of RI
    assert rd(u, MSR) == 0xB0 | 0x04


def test_scratch_and_mirrored_offsets(uart) -> None:
    u, _, be = uart
    wr(u, SCR, 0x5A)
    assert rd(u, SCR) == 0x5A
    u.write(8, 1, ord("m"))                       # registers repeat every 8 bytes
    assert be.output == b"m"
    assert u.read(0x80 + SCR, 1) == 0x5A


def test_sbi_getchar(uart) -> None:
    u, _, be = uart
    assert u.take_host_byte() == -1
    be.feed(b"ok")
    assert (u.take_host_byte(), u.take_host_byte(), u.take_host_byte()) == (ord("o"), ord("k"), -1)


def test_input_before_construction_is_kept() -> None:
    be = FakeCharBackend()
    be.feed(b"early")
    u = Uart16550(IrqLine(), be)
    assert drain(u) == b"early"


def test_save_load_round_trip(uart) -> None:
    u, irq, be = uart
    wr(u, IIR_FCR, 0xC1)
    wr(u, IER, 0x01)
    wr(u, SCR, 7)
    be.feed(b"0123456789" * 3)
    assert rd(u, RBR_THR) == ord("0")
    state = u.save()
    irq2, be2 = IrqLine(), FakeCharBackend()
    u2 = Uart16550(irq2, be2)
    u2.load(state)
    assert irq2.level == irq.level
    assert rd(u2, SCR) == 7 and rd(u2, IIR_FCR) == rd(u, IIR_FCR)
    assert drain(u2) == drain(u) == (b"0123456789" * 3)[1:]


def test_reset_keeps_host_input(uart) -> None:
    u, irq, be = uart
    wr(u, IER, 0x03)
    wr(u, LCR, 0x83)
    be.feed(b"q")
    u.reset()
    assert (rd(u, IER), rd(u, LCR), irq.level) == (0, 0, False)
    assert drain(u) == b"q"
