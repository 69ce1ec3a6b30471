//! Datamover Jobs.
