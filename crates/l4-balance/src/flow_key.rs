use std::net::SocketAddr;

/// Transport protocol of a flow.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Protocol {
    /// A TCP connection.
    Tcp,
    /// A UDP flow.
    Udp,
}

/// What selection may look at: the 5-tuple of the client's flow as the balancer sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct FlowKey {
    /// The client's address and port.
    pub client: SocketAddr,
    /// The local (listener) address the client reached.
    pub local: SocketAddr,
    /// TCP or UDP.
    pub protocol: Protocol,
}
