//! x86-64 AVX-512 VNNI kernels (placeholder until written).

use super::Isa;

pub(crate) fn isa() -> Option<&'static Isa> {
    None
}
