//! TLS as the dataplane sees it: for now, the ClientHello that is a
//! connection's decision point. Knows nothing of TCP or AF_XDP: it is given
//! a client's in-order bytes.

pub mod hello;
