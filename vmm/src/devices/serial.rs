//! COM1, a 16550 UART from vm-superio. ddvm guests poll it; there are no interrupts to raise.

use std::io::Write;
use std::sync::Arc;

use vm_superio::{Serial, Trigger};

use super::BusDevice;
use crate::console::Console;

/// Interrupt trigger of a UART nobody takes interrupts from.
pub struct NoInterrupt;

impl Trigger for NoInterrupt {
    type E = std::convert::Infallible;
    fn trigger(&self) -> Result<(), Self::E> {
        Ok(())
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
pub struct SerialPort(Serial<NoInterrupt, vm_superio::serial::NoEvents, ConsoleWriter>);

impl SerialPort {
    /// A UART writing into `console`.
    pub fn new(console: Arc<Console>) -> Self {
        SerialPort(Serial::new(NoInterrupt, ConsoleWriter(console)))
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
            // Output errors cannot happen with our writer; a guest cannot make them happen.
            let _ = self.0.write(o, v);
        }
    }
}
