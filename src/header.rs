//! placeholder
#![allow(missing_docs)]
#[derive(Debug)] pub struct KeepAliveHeader;
#[derive(Debug)] pub struct InvalidKeepAlive;
