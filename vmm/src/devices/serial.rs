//! The 16550 UART at COM1 (ports 0x3f8..0x3ff, IRQ 4), from vm-superio, with the guest's
//! output appended to a console log file in the VM's directory.

use std::fs::{File, OpenOptions};
use std::io::{self, LineWriter};
use std::path::Path;
use std::sync::Arc;

use kvm_ioctls::VmFd;
use vm_superio::{Serial, Trigger, serial::NoEvents};

/// First I/O port of COM1.
pub const COM1_BASE: u16 = 0x3f8;
/// Number of COM1 registers.
pub const COM1_LEN: u16 = 8;
/// ISA interrupt line of COM1.
pub const COM1_IRQ: u32 = 4;

/// How the UART raises its interrupt.
#[derive(Debug, Clone)]
pub enum SerialInterrupt {
    /// No interrupt controller (the built-in guest polls the line status register).
    None,
    /// Pulse an in-kernel irqchip line (Linux guests).
    IrqLine(Arc<VmFd>, u32),
}

impl Trigger for SerialInterrupt {
    type E = io::Error;

    fn trigger(&self) -> io::Result<()> {
        match self {
            Self::None => Ok(()),
            Self::IrqLine(vm, line) => {
                vm.set_irq_line(*line, true).map_err(io::Error::other)?;
                vm.set_irq_line(*line, false).map_err(io::Error::other)
            }
        }
    }
}

/// The console: a 16550 whose transmitted bytes go to a log file, line-buffered.
#[derive(Debug)]
pub struct Console {
    serial: Serial<SerialInterrupt, NoEvents, LineWriter<File>>,
}

impl Console {
    /// Creates the console, appending to `log_path` (created if missing).
    pub fn new(log_path: &Path, interrupt: SerialInterrupt) -> io::Result<Self> {
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(log_path)?;
        Ok(Self {
            serial: Serial::new(interrupt, LineWriter::new(file)),
        })
    }

    /// A guest `in` from register `offset` (0..8).
    pub fn read(&mut self, offset: u8) -> u8 {
        self.serial.read(offset)
    }

    /// A guest `out` to register `offset` (0..8). A failing log file loses console
    /// output but never stops the VM.
    pub fn write(&mut self, offset: u8, value: u8) {
        let _ = self.serial.write(offset, value);
    }

    /// Flushes buffered console output to the log file.
    pub fn flush(&mut self) {
        use std::io::Write as _;
        let _ = self.serial.writer_mut().flush();
    }
}
