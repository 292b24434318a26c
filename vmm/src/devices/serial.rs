//! COM1, a 16550 UART from vm-superio. ddvm's own guests poll it; a stock kernel takes its
//! interrupts (transmitter empty, above all), raised on an eventfd the VMM makes an irqfd.

use std::io::Write;
use std::sync::Arc;

use vm_superio::{Serial, Trigger};
use vmm_sys_util::eventfd::EventFd;

use super::BusDevice;
use crate::console::Console;

/// The UART's interrupt line: an eventfd (an irqfd), or none for a guest that polls.
pub struct IrqLine(Option<EventFd>);

impl Trigger for IrqLine {
    type E = std::io::Error;
    fn trigger(&self) -> Result<(), Self::E> {
        match &self.0 {
            Some(fd) => fd.write(1),
            None => Ok(()),
        }
    }
}

/// Serial output goes to the guest's console.
pub struct ConsoleWriter(Arc<Console>);

impl Write for ConsoleWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.push(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// The UART on the port bus.
pub struct SerialPort(Serial<IrqLine, vm_superio::serial::NoEvents, ConsoleWriter>);

impl SerialPort {
    /// A UART writing into `console`, without interrupts.
    pub fn new(console: Arc<Console>) -> Self {
        SerialPort(Serial::new(IrqLine(None), ConsoleWriter(console)))
    }

    /// A UART writing into `console` that raises its interrupts on `irq`.
    pub fn with_interrupt(console: Arc<Console>, irq: EventFd) -> Self {
        SerialPort(Serial::new(IrqLine(Some(irq)), ConsoleWriter(console)))
    }

    /// Whether an interrupt is pending (IIR's "no interrupt" bit clear), read without the
    /// side effects of reading IIR: what keeps a level-triggered line asserted.
    pub fn interrupt_pending(&self) -> bool {
        self.0.state().interrupt_identification & 1 == 0
    }
}

impl BusDevice for SerialPort {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        let v = u8::try_from(offset).map_or(0xff, |o| self.0.read(o));
        data.fill(0);
        if let Some(first) = data.first_mut() {
            *first = v;
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if let (Ok(o), Some(&v)) = (u8::try_from(offset), data.first()) {
            // Output errors cannot happen with our writer, nor interrupt errors with an
            // eventfd (its counter cannot overflow from one write per byte).
            let _ = self.0.write(o, v);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::console::Echo;

    #[test]
    fn the_pending_interrupt_is_read_without_clearing_it() {
        let irq = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let mut uart = SerialPort::with_interrupt(Arc::new(Console::new("t", Echo::Off)), irq);
        assert!(!uart.interrupt_pending());
        // IER: transmitter-empty interrupts on; the transmitter is empty, so one is pending.
        uart.write(1, &[0x02]);
        assert!(uart.interrupt_pending());
        assert!(uart.interrupt_pending(), "asking does not clear it");
        // Reading IIR (as the driver's handler does) clears it.
        let mut iir = [0u8];
        uart.read(2, &mut iir);
        assert_eq!(iir[0] & 0x0f, 0x02, "IIR: transmitter empty");
        assert!(!uart.interrupt_pending());
    }
}
