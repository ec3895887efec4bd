"""NS16550A UART, as Linux's 8250 driver uses it on QEMU's virt board
(device tree "ns16550a", reg-shift 0, reg-io-width 1).

Registers (PC16550D datasheet, "Register Description"; offsets repeat every
8 bytes across the window)::

    off  DLAB=0 read   DLAB=0 write   DLAB=1
    0    RBR           THR            DLL
    1    IER           IER            DLM
    2    IIR           FCR            (IIR / FCR)
    3    LCR           LCR
    4    MCR           MCR
    5    LSR           (ignored)
    6    MSR           (ignored)
    7    SCR           SCR

Interrupts, highest priority first ("Interrupt Identification Register"):

    IIR 0x6  receiver line status (OE/PE/FE/BI)   cleared by reading LSR
    IIR 0x4  received data available (at the FIFO trigger level)
    IIR 0xC  character timeout (data below the trigger level; FIFO mode)
                                                  both cleared by reading RBR
    IIR 0x2  transmitter holding register empty   cleared by reading IIR (when
                                                  it is the source) or writing THR
    IIR 0x0  modem status                         cleared by reading MSR

Transmission is instant: a byte written to THR goes to the backend at once,
so THR is empty again immediately and LSR always shows THRE|TEMT.  The THRE
interrupt follows the datasheet's rule: it becomes pending when ETBEI is
enabled while THR is empty and each time THR empties after a write.

Input from the host waits in a bounded host-side queue (`HOST_QUEUE_LIMIT`)
and moves into the 16-byte receive FIFO (1-byte holding register with FIFOs
off) as the guest reads, so input is never overrun while the guest is busy;
only bytes beyond the host queue's cap are dropped (and counted).
"""

from __future__ import annotations

from collections import deque
from typing import Any

from pyvirt.backends.char import CharBackend
from pyvirt.devices.base import IrqLine
from pyvirt.state import U8, U64, Schema, blob, boolean, integer, record

FIFO_SIZE = 16
HOST_QUEUE_LIMIT = 64 * 1024

RBR_THR, IER, IIR_FCR, LCR, MCR, LSR, MSR, SCR = range(8)

# IER: interrupt enables
IER_ERBFI, IER_ETBEI, IER_ELSI, IER_EDSSI = 0x01, 0x02, 0x04, 0x08
# IIR: interrupt identification (bit 0 = no interrupt pending)
IIR_NONE, IIR_MSI, IIR_THRI, IIR_RDI, IIR_RLSI, IIR_CTI = 0x01, 0x00, 0x02, 0x04, 0x06, 0x0C
IIR_FIFOS_ON = 0xC0
# FCR: FIFO control
FCR_ENABLE, FCR_CLEAR_RX, FCR_CLEAR_TX, FCR_DMA_MODE = 0x01, 0x02, 0x04, 0x08
FCR_TRIGGER = {0x00: 1, 0x40: 4, 0x80: 8, 0xC0: 14}
# LCR: line control
LCR_DLAB = 0x80
# MCR: modem control
MCR_DTR, MCR_RTS, MCR_OUT1, MCR_OUT2, MCR_LOOP = 0x01, 0x02, 0x04, 0x08, 0x10
# LSR: line status
LSR_DR, LSR_OE, LSR_PE, LSR_FE, LSR_BI, LSR_THRE, LSR_TEMT, LSR_FIFOE = 1, 2, 4, 8, 16, 32, 64, 128
LSR_ERRORS = LSR_OE | LSR_PE | LSR_FE | LSR_BI
# MSR: modem status (deltas in the low nibble)
MSR_DCTS, MSR_DDSR, MSR_TERI, MSR_DDCD = 0x01, 0x02, 0x04, 0x08
MSR_CTS, MSR_DSR, MSR_RI, MSR_DCD = 0x10, 0x20, 0x40, 0x80
MSR_DELTAS = 0x0F
# Not in loopback the lines read as a cable with the other end ready.
MSR_CONNECTED = MSR_DCD | MSR_DSR | MSR_CTS


class Uart16550:
    """One NS16550A.  `irq` is its interrupt line, `backend` the host side."""

    SIZE = 0x100

    def __init__(self, irq: IrqLine, backend: CharBackend) -> None:
        self.irq = irq
        self.backend = backend
        self.host: deque[int] = deque()     # typed on the host, not yet in the FIFO
        self.dropped = 0                    # host bytes lost to a full host queue
        self.reset()
        backend.set_input_handler(self.receive)

    def reset(self) -> None:
        """Master reset values (datasheet Table IV).  Input the guest has not read
        goes back to the host queue: a reset loses none of it."""
        if hasattr(self, "rx"):
            self.host.extendleft(reversed(self.rx))
        self.rx: deque[int] = deque()
        self.ier = 0
        self.lcr = 0
        self.mcr = 0
        self.scr = 0
        self.fcr = 0
        self.dll, self.dlm = 0x0C, 0        # 9600 baud from 1.8432 MHz; Linux reprograms it
        self.lsr_err = 0                    # sticky OE/PE/FE/BI until LSR is read
        self.thr_pending = False            # the THRE interrupt source
        self.msr = MSR_CONNECTED
        self._refill()

    # -- host side ---------------------------------------------------------------------
    def receive(self, data: bytes) -> None:
        """Bytes from the host; kept until the guest has read them."""
        room = HOST_QUEUE_LIMIT - len(self.host)
        if len(data) > room:
            self.dropped += len(data) - max(room, 0)
            data = data[:max(room, 0)]
        self.host.extend(data)
        self._refill()

    def take_host_byte(self) -> int:
        """For the SBI legacy console_getchar: the next input byte, or -1."""
        if self.mcr & MCR_LOOP:
            return -1
        self._refill()
        if not self.rx:
            return -1
        b = self.rx.popleft()
        self._refill()
        return b

    def _capacity(self) -> int:
        return FIFO_SIZE if self.fcr & FCR_ENABLE else 1

    def _refill(self) -> None:
        """Move host input into the receive FIFO (not in loopback: the line is cut)."""
        if not self.mcr & MCR_LOOP:
            cap = self._capacity()
            host, rx = self.host, self.rx
            while host and len(rx) < cap:
                rx.append(host.popleft())
        self._update()

    # -- interrupts --------------------------------------------------------------------
    def _iir(self) -> int:
        """The pending interrupt of highest priority (IIR bits 0-3)."""
        ier = self.ier
        if ier & IER_ELSI and self.lsr_err:
            return IIR_RLSI
        if ier & IER_ERBFI and self.rx:
            if not self.fcr & FCR_ENABLE or len(self.rx) >= FCR_TRIGGER[self.fcr & 0xC0]:
                return IIR_RDI
            return IIR_CTI
        if ier & IER_ETBEI and self.thr_pending:
            return IIR_THRI
        if ier & IER_EDSSI and self.msr & MSR_DELTAS:
            return IIR_MSI
        return IIR_NONE

    def _update(self) -> None:
        self.irq.set(self._iir() != IIR_NONE)

    def _modem_lines(self) -> int:
        """MSR bits 4-7: in loopback they follow MCR's outputs (DTR->DSR, RTS->CTS,
        OUT1->RI, OUT2->DCD)."""
        m = self.mcr
        if not m & MCR_LOOP:
            return MSR_CONNECTED
        return (((m & MCR_DTR) and MSR_DSR) | ((m & MCR_RTS) and MSR_CTS)
                | ((m & MCR_OUT1) and MSR_RI) | ((m & MCR_OUT2) and MSR_DCD))

    def _set_modem_lines(self, new: int) -> None:
        old = self.msr
        delta = 0
        if (old ^ new) & MSR_CTS:
            delta |= MSR_DCTS
        if (old ^ new) & MSR_DSR:
            delta |= MSR_DDSR
        if old & MSR_RI and not new & MSR_RI:        # trailing edge of RI
            delta |= MSR_TERI
        if (old ^ new) & MSR_DCD:
            delta |= MSR_DDCD
        self.msr = new | (old & MSR_DELTAS) | delta

    # -- registers ---------------------------------------------------------------------
    def read(self, offset: int, size: int) -> int:
        reg = offset & 7
        if reg == RBR_THR:
            if self.lcr & LCR_DLAB:
                return self.dll
            value = self.rx.popleft() if self.rx else 0
            self._refill()
            return value
        if reg == IER:
            return self.dlm if self.lcr & LCR_DLAB else self.ier
        if reg == IIR_FCR:
            iir = self._iir()
            if iir == IIR_THRI:                 # reading IIR clears a THRE interrupt
                self.thr_pending = False
                self._update()
            return iir | (IIR_FIFOS_ON if self.fcr & FCR_ENABLE else 0)
        if reg == LCR:
            return self.lcr
        if reg == MCR:
            return self.mcr
        if reg == LSR:
            lsr = LSR_THRE | LSR_TEMT | self.lsr_err | (LSR_DR if self.rx else 0)
            if self.lsr_err:
                self.lsr_err = 0                # error bits clear on read
                self._update()
            return lsr
        if reg == MSR:
            value = self.msr
            if value & MSR_DELTAS:
                self.msr &= ~MSR_DELTAS         # deltas clear on read
                self._update()
            return value
        return self.scr

    def write(self, offset: int, size: int, value: int) -> None:
        reg = offset & 7
        value &= 0xFF
        if reg == RBR_THR:
            if self.lcr & LCR_DLAB:
                self.dll = value
                return
            self._transmit(value)
        elif reg == IER:
            if self.lcr & LCR_DLAB:
                self.dlm = value
                return
            changed = (self.ier ^ value) & 0x0F
            self.ier = value & 0x0F
            if changed & IER_ETBEI:
                # Enabling ETBEI with THR empty raises THRE at once; disabling drops it.
                self.thr_pending = bool(self.ier & IER_ETBEI)
            self._update()
        elif reg == IIR_FCR:
            self._write_fcr(value)
        elif reg == LCR:
            self.lcr = value
        elif reg == MCR:
            was_loop = self.mcr & MCR_LOOP
            self.mcr = value & 0x1F
            self._set_modem_lines(self._modem_lines())
            if was_loop and not self.mcr & MCR_LOOP:
                self._refill()                  # the host line is connected again
            self._update()
        elif reg == SCR:
            self.scr = value
        # LSR and MSR writes are ignored (factory test only on the real part).

    def _transmit(self, value: int) -> None:
        if self.mcr & MCR_LOOP:                 # loopback: transmitter feeds the receiver
            if len(self.rx) < self._capacity():
                self.rx.append(value)
            else:
                self.lsr_err |= LSR_OE
        else:
            self.backend.write(bytes((value,)))
        self.thr_pending = True                 # sent at once: THR is empty again
        self._update()

    def _write_fcr(self, value: int) -> None:
        enable = value & FCR_ENABLE
        if enable != self.fcr & FCR_ENABLE:     # switching FIFO mode empties both FIFOs
            self.rx.clear()
        elif enable and value & FCR_CLEAR_RX:
            self.rx.clear()
        # FCR_CLEAR_TX: the transmit FIFO is always empty here.
        self.fcr = value & (FCR_ENABLE | FCR_DMA_MODE | 0xC0) if enable else 0
        self._refill()

    # -- state -------------------------------------------------------------------------
    def state_schema(self) -> Schema:
        """What `load()` accepts (checked before it runs; pyvirt/state.py)."""
        return record({"rx": blob(FIFO_SIZE), "host": blob(HOST_QUEUE_LIMIT), "ier": integer(0, 0x0F),
                       "lcr": U8, "mcr": integer(0, 0x1F), "scr": U8, "fcr": U8, "dll": U8, "dlm": U8,
                       "lsr_err": U8, "thr_pending": boolean, "msr": U8, "dropped": U64})

    def save(self) -> dict[str, Any]:
        return {"rx": bytes(self.rx), "host": bytes(self.host), "ier": self.ier, "lcr": self.lcr,
                "mcr": self.mcr, "scr": self.scr, "fcr": self.fcr, "dll": self.dll, "dlm": self.dlm,
                "lsr_err": self.lsr_err, "thr_pending": self.thr_pending, "msr": self.msr,
                "dropped": self.dropped}

    def load(self, state: dict[str, Any]) -> None:
        self.rx = deque(state["rx"])
        self.host = deque(state["host"])
        for k in ("ier", "lcr", "mcr", "scr", "fcr", "dll", "dlm", "lsr_err", "thr_pending",
                  "msr", "dropped"):
            setattr(self, k, state[k])
        self._refill()
