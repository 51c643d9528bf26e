//! Reporting a mapped file that shrinks under the running process.
//!
//! Model files and checkpoints are read through memory maps. If another
//! process truncates (or rewrites in place) a file while it is mapped, the
//! next read of a page past the new end raises `SIGBUS`, which by default
//! kills the process with no message (shell status 135). No reader can
//! prevent that fault; this module turns it into a one-line error naming the
//! file and a distinct exit status, [`EXIT_STATUS`] (74, `EX_IOERR` of
//! `sysexits.h`):
//!
//! ```text
//! error: m.nbl: the mapped file shrank or changed under the running process (SIGBUS); do not replace or truncate a model file in place while it is in use
//! ```
//!
//! The library never installs the handler by itself (a library must not exit
//! its host process): a program opts in with [`install`], as the `nibble` and
//! `nibble-tools` binaries do first thing in `main`. Every map the library
//! and the converter make goes through [`Mmap::map`], which registers the
//! mapped range and the pre-formatted message in a fixed table of atomic
//! pointers that the handler reads without locks or allocation; inside the
//! handler only `write(2)`, `sigaction(2)`, `raise(3)`, `pause(2)` and
//! `_exit(2)` are called, all async-signal-safe. The fault address
//! (`si_addr`) picks the file when several are mapped.
//!
//! A `SIGBUS` that is not a fault inside a registered map (a `kill -BUS`, or
//! a fault elsewhere) prints `error: bus error (SIGBUS) outside the mapped
//! model files` and is passed on to the disposition that was in place before
//! [`install`] (Rust's own handler, then the default: the process dies by the
//! signal as before).
//!
//! Each registration made after [`install`] leaks one small entry (the
//! message and the range, about 200 bytes) because the handler may be
//! reading it at any moment; a process maps a handful of files, so this is
//! bounded in practice. Before [`install`] (and in programs that never call
//! it) nothing is registered or leaked.
//!
//! The rule this enforces by reporting: never replace or truncate a model in
//! place while a process uses it; write a new file and rename it over the
//! old one (as `nibble-tools convert` does), which leaves running processes
//! on the old, intact file.
//!
//! Only Linux and Android install a handler; elsewhere [`install`] does
//! nothing and [`Mmap`] is a plain map.

use std::fs::File;
use std::ops::Deref;
use std::path::Path;

/// The exit status after a mapped file shrank under the process: 74,
/// `EX_IOERR` ("an error occurred while doing I/O on some file").
pub const EXIT_STATUS: i32 = 74;

/// A read-only memory map of a file, registered (once [`install`] was called)
/// so that a `SIGBUS` inside it is reported with the file's name. It
/// dereferences to [`memmap2::Mmap`], so every method of the plain map is
/// available.
pub struct Mmap {
    map: memmap2::Mmap,
    _registration: imp::Registration,
}

impl Mmap {
    /// Maps `file` read-only; `path` is the name reported if the file
    /// shrinks while mapped.
    ///
    /// # Safety
    ///
    /// The same contract as [`memmap2::Mmap::map`]: the file must not be
    /// modified while mapped (this module only reports the truncation case).
    pub unsafe fn map(file: &File, path: &Path) -> std::io::Result<Self> {
        // SAFETY: forwarded to the caller, who upholds `memmap2::Mmap::map`'s
        // contract (see this function's `# Safety`).
        let map = unsafe { memmap2::Mmap::map(file)? };
        let registration = imp::register(map.as_ptr() as usize, map.len(), path);
        Ok(Self {
            map,
            _registration: registration,
        })
    }
}

impl Deref for Mmap {
    type Target = memmap2::Mmap;
    fn deref(&self) -> &memmap2::Mmap {
        &self.map
    }
}

impl AsRef<[u8]> for Mmap {
    fn as_ref(&self) -> &[u8] {
        &self.map
    }
}

/// Installs the `SIGBUS` handler for the rest of the process (idempotent).
/// Call it before mapping files: maps made earlier are not registered.
pub fn install() {
    imp::install();
}

/// The message the handler would print for a fault at `addr` (without the
/// final newline), or `None` when `addr` is in no registered map. For tests.
#[doc(hidden)]
pub fn message_for(addr: usize) -> Option<String> {
    imp::message_for(addr)
}

#[cfg(any(target_os = "linux", target_os = "android"))]
mod imp {
    use std::path::Path;
    use std::ptr;
    use std::sync::atomic::{AtomicBool, AtomicPtr, AtomicUsize, Ordering};
    use std::sync::{Once, OnceLock};

    /// One registered map: its address range and the pre-formatted line.
    /// Never freed once published (the handler may hold a reference).
    struct Entry {
        start: usize,
        len: usize,
        message: Box<[u8]>,
    }

    const SLOTS: usize = 64;
    #[allow(clippy::declare_interior_mutable_const)]
    const EMPTY: AtomicPtr<Entry> = AtomicPtr::new(ptr::null_mut());
    static TABLE: [AtomicPtr<Entry>; SLOTS] = [EMPTY; SLOTS];
    /// Registrations that found the table full; the handler then reports a
    /// fault outside the table's maps with a generic line.
    static OVERFLOW: AtomicUsize = AtomicUsize::new(0);
    static INSTALLED: AtomicBool = AtomicBool::new(false);
    /// Set by the first thread that reports a fault; others wait for it to
    /// exit, so exactly one line is printed.
    static REPORTING: AtomicBool = AtomicBool::new(false);
    static PREVIOUS: OnceLock<libc::sigaction> = OnceLock::new();
    static INSTALL: Once = Once::new();

    const OVERFLOW_MESSAGE: &[u8] = b"error: a mapped file shrank or changed under the running \
        process (SIGBUS); do not replace or truncate a model file in place while it is in use\n";
    const FOREIGN_MESSAGE: &[u8] = b"error: bus error (SIGBUS) outside the mapped model files\n";

    fn line(path: &Path) -> String {
        format!(
            "error: {}: the mapped file shrank or changed under the running process (SIGBUS); \
             do not replace or truncate a model file in place while it is in use",
            path.display()
        )
    }

    pub(super) enum Registration {
        None,
        Slot(usize),
        Overflow,
    }

    impl Drop for Registration {
        fn drop(&mut self) {
            match *self {
                Self::None => {}
                // The entry stays allocated: a handler running on another
                // thread may still be reading it.
                Self::Slot(i) => TABLE[i].store(ptr::null_mut(), Ordering::Release),
                Self::Overflow => {
                    OVERFLOW.fetch_sub(1, Ordering::AcqRel);
                }
            }
        }
    }

    pub(super) fn register(start: usize, len: usize, path: &Path) -> Registration {
        if len == 0 || !INSTALLED.load(Ordering::Acquire) {
            return Registration::None;
        }
        let mut message = line(path).into_bytes();
        message.push(b'\n');
        let entry = Box::into_raw(Box::new(Entry {
            start,
            len,
            message: message.into_boxed_slice(),
        }));
        for (i, slot) in TABLE.iter().enumerate() {
            if slot
                .compare_exchange(ptr::null_mut(), entry, Ordering::AcqRel, Ordering::Relaxed)
                .is_ok()
            {
                return Registration::Slot(i);
            }
        }
        // SAFETY: `entry` came from `Box::into_raw` above and was published
        // nowhere (every compare-exchange failed), so this is its only owner.
        drop(unsafe { Box::from_raw(entry) });
        OVERFLOW.fetch_add(1, Ordering::AcqRel);
        Registration::Overflow
    }

    /// The registered entry containing `addr`. Lock- and allocation-free:
    /// callable from the signal handler.
    fn find(addr: usize) -> Option<&'static Entry> {
        TABLE.iter().find_map(|slot| {
            let p = slot.load(Ordering::Acquire);
            // SAFETY: a non-null pointer in the table came from
            // `Box::into_raw` in `register` and is never freed, so it points
            // to a valid, immutable `Entry` for the rest of the process.
            let e = unsafe { p.as_ref() }?;
            (addr >= e.start && addr - e.start < e.len).then_some(e)
        })
    }

    pub(super) fn message_for(addr: usize) -> Option<String> {
        find(addr).map(|e| String::from_utf8_lossy(&e.message).trim_end().to_owned())
    }

    /// `write(2)` all of `bytes` to stderr, retrying on partial writes and
    /// `EINTR`; gives up silently on any other error. Async-signal-safe.
    fn write_stderr(mut bytes: &[u8]) {
        while !bytes.is_empty() {
            // SAFETY: `bytes` is a valid slice for its length; write(2) only
            // reads it.
            let n = unsafe { libc::write(2, bytes.as_ptr().cast(), bytes.len()) };
            if n > 0 {
                bytes = &bytes[n as usize..];
            } else if n < 0
                // SAFETY: reading errno through the libc accessor is
                // async-signal-safe and the pointer is valid for this thread.
                && unsafe { *libc::__errno_location() } == libc::EINTR
            {
                continue;
            } else {
                return;
            }
        }
    }

    extern "C" fn on_sigbus(_sig: libc::c_int, info: *mut libc::siginfo_t, _: *mut libc::c_void) {
        // SAFETY: with SA_SIGINFO the kernel passes a valid siginfo_t.
        let info = unsafe { &*info };
        // si_code > 0 means the kernel raised it for a fault, so si_addr is
        // the faulting address; a kill(2)/tgkill(2) (si_code <= 0) has none.
        let fault = info.si_code > 0;
        // SAFETY: si_addr is the union member the kernel fills for SIGBUS
        // faults; read only when `fault`.
        let addr = if fault {
            unsafe { info.si_addr() as usize }
        } else {
            0
        };
        let message = match find(addr) {
            Some(e) if fault => Some(&e.message[..]),
            _ if fault && OVERFLOW.load(Ordering::Acquire) > 0 => Some(OVERFLOW_MESSAGE),
            _ => None,
        };
        if let Some(message) = message {
            if REPORTING.swap(true, Ordering::AcqRel) {
                // Another thread is reporting and about to exit.
                loop {
                    // SAFETY: pause(2) is async-signal-safe and has no
                    // preconditions.
                    unsafe { libc::pause() };
                }
            }
            write_stderr(message);
            // SAFETY: _exit(2) is async-signal-safe; it ends the process
            // without running destructors or atexit handlers, which must
            // not run from a signal handler.
            unsafe { libc::_exit(super::EXIT_STATUS) };
        }
        write_stderr(FOREIGN_MESSAGE);
        // Not ours. A fault goes to the previous disposition (Rust's
        // stack-overflow check, then the default): restored here, it gets
        // the fault again when the faulting instruction re-executes on
        // return. A sent signal gets the default action (death by SIGBUS):
        // re-raised, it stays blocked until this handler returns. (Rust's
        // handler would swallow a sent signal, so it is not used for that.)
        match PREVIOUS.get() {
            Some(previous) if fault => {
                // SAFETY: `previous` is the action sigaction(2) returned at
                // install time; restoring it is async-signal-safe.
                unsafe { libc::sigaction(libc::SIGBUS, previous, ptr::null_mut()) };
            }
            _ => {
                // SAFETY: signal(2) and raise(3) are async-signal-safe.
                unsafe { libc::signal(libc::SIGBUS, libc::SIG_DFL) };
                if !fault {
                    // SAFETY: as above.
                    unsafe { libc::raise(libc::SIGBUS) };
                }
            }
        }
    }

    pub(super) fn install() {
        INSTALL.call_once(|| {
            // SAFETY: an all-zero sigaction is a valid value (no handler,
            // empty mask, no flags) that is then filled in.
            let mut action: libc::sigaction = unsafe { std::mem::zeroed() };
            action.sa_sigaction = on_sigbus as *const () as usize;
            action.sa_flags = libc::SA_SIGINFO | libc::SA_ONSTACK;
            // SAFETY: `action.sa_mask` is a valid sigset_t to initialize.
            unsafe { libc::sigemptyset(&mut action.sa_mask) };
            // SAFETY: an all-zero sigaction is valid storage for the
            // previous action.
            let mut previous: libc::sigaction = unsafe { std::mem::zeroed() };
            // Registering must be on before a fault can find the table, and
            // the previous action recorded before the handler can run.
            INSTALLED.store(true, Ordering::Release);
            // SAFETY: both pointers are valid; the handler only performs
            // async-signal-safe operations (see the module docs).
            let ok = unsafe { libc::sigaction(libc::SIGBUS, ptr::null(), &mut previous) } == 0;
            if ok {
                let _ = PREVIOUS.set(previous);
                // SAFETY: as above.
                unsafe { libc::sigaction(libc::SIGBUS, &action, ptr::null_mut()) };
            }
        });
    }
}

#[cfg(not(any(target_os = "linux", target_os = "android")))]
mod imp {
    use std::path::Path;

    pub(super) struct Registration;

    pub(super) fn register(_start: usize, _len: usize, _path: &Path) -> Registration {
        Registration
    }

    pub(super) fn message_for(_addr: usize) -> Option<String> {
        None
    }

    pub(super) fn install() {}
}
