//! The 16550 UART at COM1 (ports 0x3f8..0x3ff, IRQ 4), from vm-superio, with the guest's
//! output appended to a console log file in the VM's directory.

use std::fs::{File, OpenOptions};
use std::io::{self, LineWriter};
use std::path::Path;
use std::sync::Arc;

use kvm_ioctls::VmFd;
use vm_superio::{Serial, Trigger, serial::NoEvents, serial::SerialState};

/// First I/O port of COM1.
pub const COM1_BASE: u16 = 0x3f8;
/// Number of COM1 registers.
pub const COM1_LEN: u16 = 8;
/// ISA interrupt line of COM1.
pub const COM1_IRQ: u32 = 4;
/// Most bytes the console log file grows to; later guest output is dropped so a chatty
/// or hostile guest cannot fill the node's disk.
pub const CONSOLE_LOG_LIMIT: u64 = 16 << 20;

/// A writer that passes bytes on until `limit` bytes have been written in total
/// (counting what the file held before), then writes one notice and drops the rest.
#[derive(Debug)]
pub struct CappedWriter<W: io::Write> {
    inner: W,
    written: u64,
    limit: u64,
    capped: bool,
}

impl<W: io::Write> CappedWriter<W> {
    /// Wraps `inner`, which already holds `already_written` bytes.
    pub fn new(inner: W, already_written: u64, limit: u64) -> Self {
        Self {
            inner,
            written: already_written,
            limit,
            capped: false,
        }
    }
}

impl<W: io::Write> io::Write for CappedWriter<W> {
    fn write(&mut self, buffer: &[u8]) -> io::Result<usize> {
        if self.written >= self.limit {
            if !self.capped {
                self.capped = true;
                let notice = format!(
                    "\n[cairn-vmm: console log reached {} bytes; further output dropped]\n",
                    self.limit
                );
                self.inner.write_all(notice.as_bytes())?;
                self.inner.flush()?;
            }
            return Ok(buffer.len());
        }
        let room = (self.limit - self.written).min(buffer.len() as u64) as usize;
        let written = self.inner.write(&buffer[..room])?;
        self.written += written as u64;
        Ok(written)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

/// The format version of [`ConsoleState`].
pub const CONSOLE_STATE_VERSION: u16 = 1;

/// The 16550's saved state (migration): vm-superio's `SerialState`, mirrored so that
/// serde stays on this side of the boundary.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[allow(missing_docs)]
pub struct ConsoleState {
    pub version: u16,
    pub baud_divisor_low: u8,
    pub baud_divisor_high: u8,
    pub interrupt_enable: u8,
    pub interrupt_identification: u8,
    pub line_control: u8,
    pub line_status: u8,
    pub modem_control: u8,
    pub modem_status: u8,
    pub scratch: u8,
    pub in_buffer: Vec<u8>,
}

/// How the UART raises its interrupt.
#[derive(Debug, Clone)]
pub enum SerialInterrupt {
    /// No interrupt: the built-in guest has no irqchip and polls the line status register.
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
    serial: Serial<SerialInterrupt, NoEvents, CappedWriter<LineWriter<File>>>,
}

impl Console {
    /// The UART's registers and receive buffer (migration).
    pub fn save_state(&self) -> ConsoleState {
        let state = self.serial.state();
        ConsoleState {
            version: CONSOLE_STATE_VERSION,
            baud_divisor_low: state.baud_divisor_low,
            baud_divisor_high: state.baud_divisor_high,
            interrupt_enable: state.interrupt_enable,
            interrupt_identification: state.interrupt_identification,
            line_control: state.line_control,
            line_status: state.line_status,
            modem_control: state.modem_control,
            modem_status: state.modem_status,
            scratch: state.scratch,
            in_buffer: state.in_buffer,
        }
    }

    /// Takes over saved UART registers, keeping this VMM's log file and interrupt line.
    pub fn restore_state(&mut self, state: &ConsoleState) -> Result<(), String> {
        if state.version != CONSOLE_STATE_VERSION {
            return Err(format!(
                "serial state version {} (this VMM reads {CONSOLE_STATE_VERSION})",
                state.version
            ));
        }
        let saved = SerialState {
            baud_divisor_low: state.baud_divisor_low,
            baud_divisor_high: state.baud_divisor_high,
            interrupt_enable: state.interrupt_enable,
            interrupt_identification: state.interrupt_identification,
            line_control: state.line_control,
            line_status: state.line_status,
            modem_control: state.modem_control,
            modem_status: state.modem_status,
            scratch: state.scratch,
            in_buffer: state.in_buffer.clone(),
        };
        // `from_state` consumes the writer and interrupt: swap a placeholder in while
        // the serial is rebuilt around them.
        let interrupt = self.serial.interrupt_evt().clone();
        let placeholder = Serial::new(
            SerialInterrupt::None,
            CappedWriter::new(
                LineWriter::new(
                    File::open("/dev/null").map_err(|error| format!("/dev/null: {error}"))?,
                ),
                0,
                0,
            ),
        );
        let writer = std::mem::replace(&mut self.serial, placeholder).into_writer();
        self.serial = Serial::from_state(&saved, interrupt, NoEvents, writer)
            .map_err(|error| format!("serial state refused: {error:?}"))?;
        Ok(())
    }

    /// Creates the console, appending to `log_path` (created if missing).
    pub fn new(log_path: &Path, interrupt: SerialInterrupt) -> io::Result<Self> {
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(log_path)?;
        let existing = file.metadata()?.len();
        let writer = CappedWriter::new(LineWriter::new(file), existing, CONSOLE_LOG_LIMIT);
        Ok(Self {
            serial: Serial::new(interrupt, writer),
        })
    }

    /// Bytes typed into the console: as many as the UART's 64-byte receive FIFO takes
    /// (0 when it is full; the sender tries the rest again).
    pub fn enqueue_input(&mut self, input: &[u8]) -> usize {
        self.serial.enqueue_raw_bytes(input).unwrap_or(0)
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write as _;

    #[test]
    fn console_output_stops_at_the_cap_with_one_notice() {
        let mut writer = CappedWriter::new(Vec::new(), 90, 100);
        writer.write_all(b"0123456789abcdef").expect("write");
        writer.write_all(b"more").expect("dropped, not an error");
        let text = String::from_utf8(writer.inner).expect("utf-8");
        assert!(
            text.starts_with("0123456789\n[cairn-vmm: console log reached 100 bytes"),
            "{text}"
        );
        assert_eq!(text.matches("further output dropped").count(), 1);
    }

    #[test]
    fn the_console_log_is_appended_and_a_guest_byte_reaches_it() {
        let path = std::env::temp_dir().join(format!("cairn-vmm-console-{}", std::process::id()));
        std::fs::write(&path, "previous boot\n").expect("seed log");
        let mut console = Console::new(&path, SerialInterrupt::None).expect("console");
        assert_ne!(
            console.read(5) & 0x20,
            0,
            "transmitter holding register empty"
        );
        for byte in b"hi\n" {
            console.write(0, *byte);
        }
        console.flush();
        assert_eq!(
            std::fs::read_to_string(&path).expect("read"),
            "previous boot\nhi\n"
        );
        std::fs::remove_file(&path).expect("remove");
    }
}
