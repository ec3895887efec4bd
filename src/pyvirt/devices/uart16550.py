"""NS16550A UART, as Linux's 8250 driver uses it (reg-shift 0, 1-byte registers).

Registers (PC16550D datasheet, "Register Description"): RBR/THR, IER, IIR/FCR,
LCR, MCR, LSR, MSR, SCR; DLL/DLM when LCR.DLAB is set.  Output is
transmitted instantly; input waits in a bounded host-side queue and moves
into the 16-byte receive FIFO as the guest drains it, so nothing the host
typed is dropped while the guest is busy.
"""

from __future__ import annotations

from collections import deque
from typing import Any

from pyvirt.backends.char import CharBackend
from pyvirt.devices.base import IrqLine

FIFO_SIZE = 16
HOST_QUEUE_LIMIT = 64 * 1024

IER_RDI, IER_THRI, IER_RLSI, IER_MSI = 1, 2, 4, 8
IIR_NONE, IIR_MSI, IIR_THRI, IIR_RDI, IIR_RLSI = 0x01, 0x00, 0x02, 0x04, 0x06
IIR_FIFO = 0xC0
LSR_DR, LSR_OE, LSR_THRE, LSR_TEMT = 0x01, 0x02, 0x20, 0x40
LCR_DLAB = 0x80
MCR_LOOP = 0x10
FCR_ENABLE, FCR_CLEAR_RX, FCR_CLEAR_TX = 1, 2, 4


class Uart16550:
    SIZE = 0x100

    def __init__(self, irq: IrqLine, backend: CharBackend) -> None:
        self.irq = irq
        self.backend = backend
        self.host: deque[int] = deque()
        backend.set_input_handler(self.receive)
        self.reset()

    def reset(self) -> None:
        self.rx: deque[int] = deque()
        self.ier = 0
        self.lcr = 0
        self.mcr = 0
        self.scr = 0
        self.fcr = 0
        self.dll, self.dlm = 12, 0
        self.lsr_err = 0
        self.thr_pending = False
        self._update()

    # -- host side ------------------------------------------------------------
    def receive(self, data: bytes) -> None:
        """Bytes typed on the host; kept until the guest reads them."""
        room = HOST_QUEUE_LIMIT - len(self.host)
        self.host.extend(data[:max(0, room)])
        self._refill()

    def take_host_byte(self) -> int:
        """For the SBI legacy getchar: the next pending input byte or -1."""
        self._refill()
        if self.rx:
            b = self.rx.popleft()
            self._refill()
            return b
        return -1

    def _refill(self) -> None:
        cap = FIFO_SIZE if self.fcr & FCR_ENABLE else 1
        while self.host and len(self.rx) < cap:
            self.rx.append(self.host.popleft())
        self._update()

    # -- interrupts --------------------------------------------------------------
    def _iir(self) -> int:
        if self.ier & IER_RLSI and self.lsr_err:
            return IIR_RLSI
        if self.ier & IER_RDI and self.rx:
            return IIR_RDI
        if self.ier & IER_THRI and self.thr_pending:
            return IIR_THRI
        return IIR_NONE

    def _update(self) -> None:
        self.irq.set(self._iir() != IIR_NONE)

    # -- registers ------------------------------------------------------------------
    def read(self, offset: int, size: int) -> int:
        if offset == 0:
            if self.lcr & LCR_DLAB:
                return self.dll
            value = self.rx.popleft() if self.rx else 0
            self._refill()
            return value
        if offset == 1:
            return self.dlm if self.lcr & LCR_DLAB else self.ier
        if offset == 2:
            iir = self._iir()
            if iir == IIR_THRI:
                self.thr_pending = False     # reading IIR clears a THRE interrupt
                self._update()
            return iir | (IIR_FIFO if self.fcr & FCR_ENABLE else 0)
        if offset == 3:
            return self.lcr
        if offset == 4:
            return self.mcr
        if offset == 5:
            lsr = LSR_THRE | LSR_TEMT | self.lsr_err | (LSR_DR if self.rx else 0)
            self.lsr_err = 0
            self._update()
            return lsr
        if offset == 6:
            if self.mcr & MCR_LOOP:   # DTR->DSR, RTS->CTS, OUT1->RI, OUT2->DCD
                m = self.mcr
                return ((m & 1) << 5) | ((m & 2) << 3) | ((m & 4) << 4) | ((m & 8) << 4)
            return 0xB0              # DCD, DSR, CTS
        if offset == 7:
            return self.scr
        return 0

    def write(self, offset: int, size: int, value: int) -> None:
        value &= 0xFF
        if offset == 0:
            if self.lcr & LCR_DLAB:
                self.dll = value
                return
            if self.mcr & MCR_LOOP:
                if len(self.rx) < FIFO_SIZE:
                    self.rx.append(value)
                else:
                    self.lsr_err |= LSR_OE
            else:
                self.backend.write(bytes((value,)))
            self.thr_pending = True       # transmitted at once: THR is empty again
            self._update()
        elif offset == 1:
            if self.lcr & LCR_DLAB:
                self.dlm = value
                return
            was = self.ier
            self.ier = value & 0x0F
            if self.ier & IER_THRI and not was & IER_THRI:
                self.thr_pending = True
            self._update()
        elif offset == 2:
            if value & FCR_CLEAR_RX:
                self.rx.clear()
            self.fcr = value & 0xC9
            self._refill()
        elif offset == 3:
            self.lcr = value
        elif offset == 4:
            self.mcr = value & 0x1F
        elif offset == 7:
            self.scr = value

    # -- state ------------------------------------------------------------------------
    def save(self) -> dict[str, Any]:
        return {"rx": bytes(self.rx), "host": bytes(self.host), "ier": self.ier, "lcr": self.lcr,
                "mcr": self.mcr, "scr": self.scr, "fcr": self.fcr, "dll": self.dll, "dlm": self.dlm,
                "lsr_err": self.lsr_err, "thr_pending": self.thr_pending}

    def load(self, state: dict[str, Any]) -> None:
        self.rx = deque(state["rx"])
        self.host = deque(state["host"])
        for k in ("ier", "lcr", "mcr", "scr", "fcr", "dll", "dlm", "lsr_err", "thr_pending"):
            setattr(self, k, state[k])
        self._update()
