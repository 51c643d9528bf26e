//! Reports on and verification of `.nbl` files.
