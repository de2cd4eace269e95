//! Pure logic, free of actors and I/O: input validation, text
//! normalisation, vector arithmetic.

pub mod text;
pub mod token;
pub mod validate;
pub mod vector;
